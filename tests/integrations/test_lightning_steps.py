"""Step-based training in Lightning: mid-epoch validation, ``Every(n_steps=...)``, ``top_k``, on_missing."""

from __future__ import annotations

import os

import pytest
import torch

lightning = pytest.importorskip("lightning", reason="the Lightning tests need the 'lightning' extra (pip install 'ckptfn[test]')")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import ckptfn  # noqa: E402
from ckptfn import Every, Strategy  # noqa: E402
from ckptfn.core.naming import member_of  # noqa: E402
from ckptfn.integrations.lightning import Checkpointing  # noqa: E402
from tests.integrations.test_lightning import make_model, trainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")


def long_epochs(steps_per_epoch: int = 40):
    """A train loader of ``steps_per_epoch`` batches of 4 and a small validation loader."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4 * steps_per_epoch, 4, generator=g)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]))
    return DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)


class Decisions(lightning.Callback):
    """The global step of every validation end (what ``Checkpointing`` decides on)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def test_last_is_at_most_n_steps_old_with_mid_epoch_validation(tmp_path):
    """The issue's case: validation every 20 steps, 3 epochs of 40 steps: last.ckpt follows every
    validation (step 120 at the end), and each best records the step it was chosen at."""
    train, val = long_epochs(40)
    every_epoch = Checkpointing([Strategy("val_loss"), Every(1, filename="last.ckpt")], dirpath=tmp_path / "epochs")
    trainer(3, [every_epoch], val_check_interval=20).fit(make_model(), train, val)
    epoch_based = ckptfn.read_metadata(tmp_path / "epochs" / "last.ckpt")
    decisions = Decisions()
    callback = Checkpointing([Strategy("val_loss"), Every(n_steps=20, filename="last.ckpt")], dirpath=tmp_path / "steps")
    trainer(3, [callback, decisions], val_check_interval=20).fit(make_model(), train, val)
    assert decisions.steps == [20, 40, 60, 80, 100, 120]
    last = ckptfn.read_metadata(tmp_path / "steps" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 120)
    assert last["saves"][-1]["every_n_steps"] == 20 and last["saves"][-1]["global_step"] == 120
    assert epoch_based["global_step"] < 120  # an epoch period lags behind mid-epoch validation
    best = ckptfn.read_metadata(tmp_path / "steps" / "best_val_loss.pt")
    assert best["global_step"] in decisions.steps and best["saves"][0]["global_step"] == best["global_step"]
    assert callback.state.bests[0].global_step == best["global_step"]
    assert callback.state.bests[1].global_step == 120


def test_top_k_in_lightning_keeps_the_k_best_validations(tmp_path):
    train, val = long_epochs(40)
    callback = Checkpointing([Strategy("val_loss", top_k=3, filename="best.ckpt")], dirpath=tmp_path)
    decisions = Decisions()
    seen = []

    class Values(lightning.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.append(float(trainer.callback_metrics["val_loss"]))

    trainer(2, [Values(), callback, decisions], val_check_interval=10).fit(make_model(), train, val)
    assert len(seen) == 8
    best = callback.state.bests[0]
    assert sorted([best.value] + [m.value for m in best.others]) == sorted(seen)[:3]
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(["best.ckpt"] + [m.name for m in best.others])
    assert all(member_of(m.name, "best.ckpt") and f"-step={m.global_step}" in m.name for m in best.others)
    for member in best.others:  # every member is a complete Lightning checkpoint
        loaded = torch.load(tmp_path / member.name, weights_only=True)
        assert loaded["global_step"] == member.global_step and "state_dict" in loaded
    resumed = Checkpointing([Strategy("val_loss", top_k=3, filename="best.ckpt")], dirpath=tmp_path)
    assert ckptfn.restore_from_directory(resumed.config, tmp_path).bests == callback.state.bests


def test_a_misspelt_monitor_fails_at_the_first_validation(tmp_path):
    """Like ``ModelCheckpoint(monitor="val_los")``: not a run to the end without checkpoints."""
    train, val = long_epochs(8)
    callback = Checkpointing([Strategy("val_los")], dirpath=tmp_path)
    with pytest.raises(ckptfn.MissingMetricError, match=r"'val_los'.*val_loss.*did you mean 'val_loss'"):
        trainer(2, [callback]).fit(make_model(), train, val)
    assert not tmp_path.exists() or os.listdir(tmp_path) == []


def test_metric_names_with_slashes_work(tmp_path):
    class SlashModel(type(make_model())):
        def validation_step(self, batch, _index):
            x, y = batch
            self.log("val/loss", torch.nn.functional.mse_loss(self.net(x), y))

    train, val = long_epochs(8)
    torch.manual_seed(0)
    callback = Checkpointing([Strategy("val/loss")], dirpath=tmp_path)
    trainer(2, [callback]).fit(SlashModel(), train, val)
    assert os.listdir(tmp_path) == ["best_val_loss.pt"]
    assert ckptfn.read_metadata(tmp_path / "best_val_loss.pt")["saves"][0]["metric_name"] == "val/loss"


def test_a_metric_warning_points_at_the_line_that_called_fit(tmp_path):
    train, val = long_epochs(8)
    callback = Checkpointing([Strategy("val_acc", on_missing="warn")], dirpath=tmp_path)
    with pytest.warns(ckptfn.MetricWarning, match="val_acc is missing") as caught:
        trainer(1, [callback]).fit(make_model(), train, val)
    (warning,) = [w for w in caught if issubclass(w.category, ckptfn.MetricWarning)]
    assert warning.filename == __file__
