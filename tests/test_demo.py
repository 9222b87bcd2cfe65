"""The reference Trainer: end to end, crash-and-resume, checkpointing off."""

from __future__ import annotations

import os
import re

import pytest
import torch

import ckptfn
from ckptfn import CheckpointWriteError
from ckptfn.demo import LAST, Trainer, concordance_loss, spearman

CONFIG = [
    {"metric_name": "val_loss", "filename": "best_loss.pt"},
    {"metric_name": "loss_components.concordance", "filename": "best_concordance.pt"},
    {"metric_name": "val_residual_spearman", "mode": "max", "filename": "best_corr.pt", "overwrite": False},
]
EPOCHS = 12


def names(directory) -> list[str]:
    """File names with archive timestamps masked, sorted."""
    return sorted(re.sub(r"_\d{8}T\d{12}Z(-\d+)?", "_<time>", n) for n in os.listdir(directory))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    seen = []
    bests = Trainer(directory, CONFIG, epochs=EPOCHS, seed=3).fit(on_epoch=lambda e, m, p: seen.append((e, m, [x.name for x in p])))
    return directory, bests, seen


def test_end_to_end_run(uninterrupted):
    directory, bests, seen = uninterrupted
    assert [e for e, _, _ in seen] == list(range(EPOCHS))
    assert set(bests) == {"best_loss.pt", "best_concordance.pt", "best_corr.pt"}
    losses = [m["val_loss"] for _, m, _ in seen]
    assert bests["best_loss.pt"] == min(losses)
    assert bests["best_corr.pt"] == max(m["val_residual_spearman"] for _, m, _ in seen)
    assert set(seen[0][2]) == {"best_loss.pt", "best_concordance.pt", "best_corr.pt"}
    assert losses[-1] < losses[0]  # it does learn
    payload, meta = ckptfn.load_checkpoint(directory / LAST)
    assert payload["epoch"] == EPOCHS - 1 and meta["epoch"] == EPOCHS - 1
    assert ckptfn.restore(ckptfn.Config.from_mapping(CONFIG), payload["manager"]).bests  # manager state inside


def test_best_checkpoint_reproduces_its_validation_loss(uninterrupted, tmp_path):
    directory, bests, _ = uninterrupted
    payload, meta = ckptfn.load_checkpoint(directory / "best_loss.pt")
    trainer = Trainer(tmp_path, None, epochs=EPOCHS, seed=3)
    trainer.model.load_state_dict(payload["model"])
    assert trainer.validate()["val_loss"] == bests["best_loss.pt"] == meta["saves"][0]["value"]


@pytest.mark.parametrize("stop_after", [3, 7])
def test_crash_and_resume_gives_the_same_bests_and_files(uninterrupted, tmp_path, stop_after):
    directory, bests, _ = uninterrupted
    Trainer(tmp_path, CONFIG, epochs=stop_after + 1, seed=3).fit()  # "crashes" after epoch stop_after
    resumed = Trainer(tmp_path, CONFIG, epochs=EPOCHS, seed=3, resume_from=tmp_path / LAST)
    assert resumed.start_epoch == stop_after + 1
    assert resumed.fit() == bests
    assert names(tmp_path) == names(directory)


def test_crash_between_best_files_and_last_pt(uninterrupted, tmp_path, monkeypatch):
    directory, bests, seen = uninterrupted
    crash_epoch = next(e for e, _, written in seen if e > 0 and "best_corr.pt" in written)
    trainer = Trainer(tmp_path, CONFIG, epochs=EPOCHS, seed=3)
    real_save = trainer.manager.save_checkpoint

    def save(state_dict, filepath, overwrite=True, metadata=None):
        if metadata["epoch"] == crash_epoch:
            raise CheckpointWriteError("power cut")
        return real_save(state_dict, filepath, overwrite, metadata)

    monkeypatch.setattr(trainer.manager, "save_checkpoint", save)
    with pytest.raises(CheckpointWriteError):
        trainer.fit()
    # last.pt is one epoch behind the best files; resuming replays that epoch without duplicating versions
    assert ckptfn.read_metadata(tmp_path / LAST)["epoch"] == crash_epoch - 1
    resumed = Trainer(tmp_path, CONFIG, epochs=EPOCHS, seed=3, resume_from=tmp_path / LAST)
    assert resumed.fit() == bests
    assert names(tmp_path) == names(directory)


def test_checkpointing_off_still_keeps_last(tmp_path):
    assert Trainer(tmp_path, None, epochs=2).fit() == {}
    assert Trainer(tmp_path / "d", {"enabled": False, "strategies": CONFIG}, epochs=2).fit() == {}
    assert sorted(os.listdir(tmp_path / "d")) == [LAST]


def test_last_pt_is_reserved(tmp_path):
    with pytest.raises(ckptfn.ConfigError, match="last.pt"):
        Trainer(tmp_path, [{"metric_name": "val_loss", "filename": "last.pt"}])


def test_metric_helpers():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, 2 * x) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert float(concordance_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(concordance_loss(x, x + 1)) > 0
