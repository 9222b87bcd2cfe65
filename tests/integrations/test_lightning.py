"""``ckptfn.integrations.lightning.Checkpointing`` with a real ``lightning.Trainer`` on a tiny model, on CPU."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import signal
import warnings

import pytest
import torch

lightning = pytest.importorskip("lightning", reason="the Lightning tests need the 'lightning' extra (pip install 'ckptfn[test]')")
from lightning.pytorch.strategies import SingleDeviceStrategy  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import ckptfn  # noqa: E402
import ckptfn.integrations.lightning as ckptfn_lightning  # noqa: E402
from ckptfn import CheckpointWriteError, Every, Last, MetricWarning, PayloadError, Periodic, Save, Strategy  # noqa: E402
from ckptfn.io.write import write_snapshot  # noqa: E402
from ckptfn.core.naming import archived_of  # noqa: E402
from ckptfn.integrations.lightning import Checkpointing  # noqa: E402

from tests.faults import FailingFS, RecordingFS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")

STRATEGIES = [
    {"metric_name": "val_loss", "filename": "best_loss.ckpt"},
    {"metric_name": "val_mae", "filename": "best_mae.ckpt", "overwrite": False, "keep": 2},
    {"metric_name": "val_score", "mode": "max", "filename": "best_score.ckpt"},
    {"every_n_epochs": 1, "filename": "last.ckpt"},
]


class TinyModel(lightning.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.05, extra: object = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, _index):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _index):
        x, y = batch
        error = self.net(x) - y
        self.log("val_loss", error.pow(2).mean())
        self.log("val_mae", error.abs().mean())
        self.log("val_score", -error.abs().max())

    def test_step(self, batch, _index):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)}


def loaders(sabotaged: bool = False):
    """Fixed train and validation data; ``sabotaged`` trains on negated targets (a run that goes wrong)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]])) + 0.3 * torch.randn(96, 1, generator=g)
    train = DataLoader(TensorDataset(x[:64], -5 * y[:64] if sabotaged else y[:64]), batch_size=16)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)
    return train, val


def make_model(**kwargs) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(**kwargs)


def trainer(max_epochs: int, callbacks, **kwargs) -> lightning.Trainer:
    options = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    return lightning.Trainer(max_epochs=max_epochs, callbacks=callbacks, **(options | kwargs))


class Recorder(lightning.Callback):
    """Records what ``Checkpointing`` (a ``Checkpoint``, so it runs after every other callback) will see."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict]] = []
        self.global_steps: list[int] = []
        self.state_at_start = None

    def on_train_epoch_start(self, trainer, pl_module):
        if self.state_at_start is None:
            self.state_at_start = trainer.checkpoint_callback.state

    def on_train_epoch_end(self, trainer, pl_module):
        self.metrics.append((trainer.current_epoch, ckptfn_lightning.plain_metrics(trainer.callback_metrics)))
        self.global_steps.append(trainer.global_step)


def oracle(config, recorded, global_steps=None):
    """The pure core over the same metrics (and global steps): the final state and each epoch's actions."""
    state, per_epoch = ckptfn.init(config), []
    for index, (epoch, metrics) in enumerate(recorded):
        at = None if global_steps is None else global_steps[index]
        state, actions = ckptfn.step(state, metrics, epoch, global_step=at)
        per_epoch.append(actions)
    return state, per_epoch


def last_epoch_of(per_epoch, filename):
    return max(a.epoch for actions in per_epoch for a in actions if isinstance(a, Save | Periodic) and a.filename == filename)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Five epochs into a directory, with a recording of the metrics each decision saw."""
    root = tmp_path_factory.mktemp("first")
    callback, recorder = Checkpointing(STRATEGIES), Recorder()
    fit = trainer(5, [callback, recorder], default_root_dir=root)
    train, val = loaders()
    fit.fit(make_model(), train, val)
    return root, callback, recorder, fit


# --- files, their content and their loaders ------------------------------------------------


def test_the_right_files_appear_with_the_decisions_of_the_pure_core(first_run):
    root, callback, recorder, fit = first_run
    assert callback.dirpath == root / "checkpoints"  # like ModelCheckpoint without a logger
    assert fit.checkpoint_callbacks == [callback]  # no default ModelCheckpoint writing on its own
    expected_state, per_epoch = oracle(callback.config, recorder.metrics, recorder.global_steps)
    assert [e for e, _ in recorder.metrics] == [0, 1, 2, 3, 4]
    assert callback.state == expected_state
    names = sorted(os.listdir(callback.dirpath))
    mae_archives = [n for n in names if archived_of(n, "best_mae.ckpt")]
    assert sorted(set(names) - set(mae_archives)) == ["best_loss.ckpt", "best_mae.ckpt", "best_score.ckpt", "last.ckpt"]
    mae_saves = [a.epoch for actions in per_epoch for a in actions if a.filename == "best_mae.ckpt"]
    assert len(mae_archives) == min(len(mae_saves), 2) - 1  # keep=2: the file plus one archived version
    for name in ("best_loss.ckpt", "best_mae.ckpt", "best_score.ckpt", "last.ckpt"):
        metadata = ckptfn.read_metadata(callback.dirpath / name)
        assert metadata["epoch"] == last_epoch_of(per_epoch, name)
        assert metadata["layout"] == "flat" and metadata["manager_state"]["format"] == "ckptfn.state/1"
    assert ckptfn.restore_from_directory(callback.config, callback.dirpath).bests == callback.state.bests
    assert callback.best_model_path == str(callback.dirpath / "best_loss.ckpt")
    assert callback.last_model_path == str(callback.dirpath / "last.ckpt")


def test_every_file_loads_with_lightning_torch_and_ckptfn(first_run):
    _, callback, _, fit = first_run
    for name in sorted(os.listdir(callback.dirpath)):
        path = callback.dirpath / name
        raw = torch.load(path, weights_only=True)  # safe loading of the whole file
        assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch", "metadata"} <= set(raw)
        model = TinyModel.load_from_checkpoint(path)
        assert model.hparams.hidden == 8 and model.hparams.lr == 0.05
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, raw["state_dict"][key])
        payload, metadata = ckptfn.load_checkpoint(path)
        assert set(payload) == set(raw) - {"metadata"} and metadata == raw["metadata"]
        assert raw["callbacks"]["ckptfn.integrations.lightning.Checkpointing"] == metadata["manager_state"]  # the state after the save
    test_results = fit.test(ckpt_path="best", dataloaders=loaders()[1], verbose=False)  # uses best_model_path
    assert "test_loss" in test_results[0]


def test_bytes_written_per_epoch_stay_one_payload_when_several_metrics_improve(tmp_path, monkeypatch):
    calls = []

    def recording_write(directory, targets, payload, metadata, **kwargs):
        fs = RecordingFS()
        paths = write_snapshot(directory, targets, payload, metadata, fs=fs, **kwargs)
        calls.append((paths, fs.ops, [os.stat(path) for path in paths]))  # before later epochs replace them
        return paths

    monkeypatch.setattr(ckptfn.io.write, "write_snapshot", recording_write)
    train, val = loaders()
    trainer(4, [Checkpointing(STRATEGIES, dirpath=tmp_path)]).fit(make_model(), train, val)
    assert len(calls) == 4  # one write per epoch (last.ckpt is saved every epoch)
    assert max(len(paths) for paths, _, _ in calls) >= 3  # some epochs improved several metrics at once
    for paths, ops, stats in calls:
        written = sum(args[0] for op, args in ops if op == "write")
        assert [op for op, _ in ops].count("create") == 1 and written == stats[0].st_size  # 1 x payload per epoch
        assert len({stat.st_ino for stat in stats}) == 1  # every name of the epoch is one file


@pytest.mark.parametrize("op, at, expected", [("write", 0, (0, 0)), ("replace", 1, (1, 0))])
def test_a_failed_write_stops_fit_and_leaves_a_state_that_matches_the_files(tmp_path, monkeypatch, op, at, expected):
    calls = []

    def failing_second_write(*args, **kwargs):
        calls.append(len(calls))
        return write_snapshot(*args, fs=FailingFS(op, at) if len(calls) == 2 else RecordingFS(), **kwargs)

    monkeypatch.setattr(ckptfn.io.write, "write_snapshot", failing_second_write)
    callback = Checkpointing([Every(1, filename="a.ckpt"), Every(1, filename="b.ckpt")], dirpath=tmp_path)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        trainer(3, [callback]).fit(make_model(), *loaders())
    assert len(calls) == 2
    assert tuple(b.epoch for b in callback.state.bests) == expected  # after replace #1 failed, a.ckpt held epoch 1, b.ckpt epoch 0
    assert ckptfn.restore_from_directory(callback.config, tmp_path).bests == callback.state.bests


# --- resuming ------------------------------------------------------------------------------


def test_resume_with_fit_ckpt_path_restores_bests_and_continues_like_one_run(tmp_path, first_run):
    _, whole, _, _ = first_run
    train, val = loaders()
    part = Checkpointing(STRATEGIES, dirpath=tmp_path)
    trainer(3, [part]).fit(make_model(), train, val)
    after_three = part.state
    resumed, recorder = Checkpointing(STRATEGIES, dirpath=tmp_path), Recorder()
    trainer(5, [resumed, recorder]).fit(make_model(), train, val, ckpt_path=tmp_path / "last.ckpt")
    assert recorder.state_at_start == after_three  # the bests came back with the checkpoint
    assert [e for e, _ in recorder.metrics] == [3, 4]
    assert resumed.state.bests == whole.state.bests  # the same decisions as the uninterrupted run
    for name in ("best_loss.ckpt", "best_score.ckpt", "last.ckpt"):
        mine, theirs = torch.load(tmp_path / name, weights_only=True), torch.load(whole.dirpath / name, weights_only=True)
        assert mine["epoch"] == theirs["epoch"]
        assert all(torch.equal(mine["state_dict"][k], theirs["state_dict"][k]) for k in theirs["state_dict"])


def test_resume_never_replaces_a_better_file_written_after_the_checkpoint(tmp_path):
    train, val = loaders()
    config = [{"metric_name": "val_loss", "filename": "best_loss.ckpt"}, {"every_n_epochs": 2, "filename": "last.ckpt"}]
    first = Checkpointing(config, dirpath=tmp_path)
    trainer(3, [first]).fit(make_model(), train, val)  # then the run "crashed": last.ckpt is from epoch 1
    best_before = first.state.bests[0]
    assert ckptfn.read_metadata(tmp_path / "last.ckpt")["epoch"] == 1 and best_before.epoch == 2
    resumed, recorder = Checkpointing(config, dirpath=tmp_path), Recorder()
    trainer(4, [resumed, recorder]).fit(make_model(), loaders(sabotaged=True)[0], val, ckpt_path=tmp_path / "last.ckpt")
    assert recorder.state_at_start.bests[0] == best_before  # the file's best, not epoch 1's from last.ckpt
    assert recorder.state_at_start.bests[1].epoch == 1  # periodic saves follow the resumed run
    assert [e for e, _ in recorder.metrics] == [2, 3]
    assert ckptfn.read_metadata(tmp_path / "best_loss.ckpt")["saves"][0]["value"] <= best_before.value


def test_a_fresh_fit_into_a_directory_with_checkpoints_judges_against_them_and_says_so(tmp_path):
    train, val = loaders()
    trainer(1, [Checkpointing(STRATEGIES, dirpath=tmp_path)]).fit(make_model(), train, val)
    with pytest.warns(UserWarning, match=r"holds checkpoints of an earlier run \(best_loss.ckpt, .*resume=False"):
        trainer(1, [Checkpointing(STRATEGIES, dirpath=tmp_path)]).fit(make_model(), train, val)
    with pytest.warns(UserWarning, match=r"already holds checkpoints \(best_loss.ckpt, .*resume=False, so bests start"):
        trainer(1, [Checkpointing(STRATEGIES, dirpath=tmp_path, resume=False)]).fit(make_model(), train, val)


def test_a_restart_that_finds_nothing_to_resume_never_destroys_the_better_best(tmp_path):
    """The reported case: crash, then fit(ckpt_path="last") finds no last checkpoint and Lightning starts
    over; a fresh callback used to replace best_loss.ckpt (0.4866 at epoch 8) with epoch 1's 0.6643."""
    train, val = loaders()
    trainer(6, [Checkpointing(STRATEGIES[:1], dirpath=tmp_path)]).fit(make_model(), train, val)
    before = ckptfn.read_metadata(tmp_path / "best_loss.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning: no "last" checkpoint to resume from
        restarted = Checkpointing([STRATEGIES[0], Every(1, filename="last.ckpt")], dirpath=tmp_path)  # no last.ckpt yet
        trainer(1, [restarted]).fit(make_model(lr=0.0), train, val, ckpt_path="last")
    after = ckptfn.read_metadata(tmp_path / "best_loss.ckpt")
    assert after["saves"][0]["value"] == before["saves"][0]["value"] and after["epoch"] == before["epoch"]


def test_an_unreadable_file_at_a_watched_name_stops_fit_naming_it(tmp_path):
    (tmp_path / "best_loss.ckpt").write_bytes(b"not a checkpoint")
    train, val = loaders()
    with pytest.raises(ckptfn.CheckpointError, match=r"best_loss.ckpt"):
        trainer(1, [Checkpointing(STRATEGIES[:1], dirpath=tmp_path)]).fit(make_model(), train, val)
    assert (tmp_path / "best_loss.ckpt").read_bytes() == b"not a checkpoint"


def test_an_interrupted_fit_leaves_the_next_fit_believing_the_files(tmp_path, monkeypatch):
    import ckptfn.io.publish

    train, val = loaders()
    callback = Checkpointing([Strategy("val_loss", filename="a.ckpt"), Strategy("val_mae", filename="b.ckpt")],
                             dirpath=tmp_path)
    trainer(1, [callback]).fit(make_model(), train, val)
    real, calls = ckptfn.io.publish._FileKind.install, []

    def interrupted(self, publisher, source, final):
        calls.append(final.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a.ckpt already holds epoch 1's snapshot
        return real(self, publisher, source, final)

    monkeypatch.setattr(ckptfn.io.publish._FileKind, "install", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with warnings.catch_warnings(), pytest.raises(SystemExit):  # Lightning's graceful shutdown
            warnings.simplefilter("ignore")
            trainer(2, [callback]).fit(make_model(), train, val)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning leaves SIGINT ignored
    monkeypatch.undo()
    on_disk = ckptfn.restore_from_directory(callback.config, tmp_path)
    trainer(2, [callback], max_steps=0).fit(make_model(), train, val)  # the next fit starts from the files
    assert callback.state.bests == on_disk.bests


# --- when decisions happen -----------------------------------------------------------------


def test_with_validation_every_second_epoch_every_3_still_saves_each_period(tmp_path):
    train, val = loaders()
    callback = Checkpointing([Every(3, filename="last.ckpt"), Strategy("val_loss")], dirpath=tmp_path)
    saved = []
    original = callback._checkpoint

    def spy(trainer):
        decides = not callback._skips(trainer)  # not the sanity check, not twice at one step
        original(trainer)
        if decides:
            saved.append((trainer.current_epoch, callback.state.bests[0]))

    callback._checkpoint = spy
    trainer(6, [callback], check_val_every_n_epoch=2).fit(make_model(), train, val)
    decided = [(epoch, last.epoch) for epoch, last in saved]
    assert decided == [(1, None), (3, 3), (5, 5)]  # ModelCheckpoint(every_n_epochs=3) would save at epoch 5 only


def test_without_validation_it_decides_at_the_end_of_each_training_epoch(tmp_path):
    train, _ = loaders()
    strict = Checkpointing([Strategy("val_loss"), Every(2, filename="last.ckpt")], dirpath=tmp_path / "strict")
    with pytest.raises(ckptfn.MissingMetricError, match="'val_loss' .* the metrics are: train_loss"):
        trainer(4, [strict], limit_val_batches=0).fit(make_model(), train)  # like ModelCheckpoint(monitor=...)
    assert not (tmp_path / "strict").exists()
    config = ckptfn.Config([Strategy("val_loss"), Every(2, filename="last.ckpt")], on_missing="warn")
    callback = Checkpointing(config, dirpath=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(4, [callback], limit_val_batches=0).fit(make_model(), train)
    skips = [str(w.message) for w in caught if issubclass(w.category, MetricWarning)]
    assert len(skips) == 1 and skips[0].startswith("val_loss is missing at epoch 0")
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert ckptfn.read_metadata(tmp_path / "last.ckpt")["epoch"] == 3


# --- what cannot be stored, what is not supported -------------------------------------------


def test_omegaconf_hyper_parameters_are_stored_as_plain_data(tmp_path):
    omegaconf = pytest.importorskip("omegaconf", reason="needs omegaconf (hydra extra)")

    class ConfiguredModel(TinyModel):
        def __init__(self, cfg) -> None:
            super().__init__(hidden=cfg.hidden)
            self.save_hyperparameters(cfg)

    train, val = loaders()
    torch.manual_seed(0)
    model = ConfiguredModel(omegaconf.OmegaConf.create({"hidden": 6, "lr": 0.05}))
    trainer(1, [Checkpointing(STRATEGIES[:1], dirpath=tmp_path)]).fit(model, train, val)
    raw = torch.load(tmp_path / "best_loss.ckpt", weights_only=True)
    assert raw["hyper_parameters"] == {"hidden": 6, "lr": 0.05} and raw["hparams_type"] == "omegaconf.dictconfig.DictConfig"
    loaded = ConfiguredModel.load_from_checkpoint(tmp_path / "best_loss.ckpt")  # cfg comes back as an AttributeDict
    assert loaded.hparams.hidden == 6 and loaded.net[0].out_features == 6


def test_a_hyper_parameter_that_weights_only_cannot_load_is_a_payload_error(tmp_path):
    train, val = loaders()
    with pytest.raises(PayloadError, match=r"payload\['hyper_parameters'\]\['extra'\].*save_hyperparameters\(ignore="):
        trainer(1, [Checkpointing(STRATEGIES, dirpath=tmp_path)]).fit(make_model(extra=object()), train, val)
    assert not tmp_path.exists() or os.listdir(tmp_path) == []


def test_strategies_that_save_their_own_way_are_refused(tmp_path):
    class ShardedLike(SingleDeviceStrategy):
        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            raise AssertionError("not used")

    train, val = loaders()
    with pytest.raises(RuntimeError, match="ShardedLike saves its checkpoints its own way"):
        trainer(1, [Checkpointing(STRATEGIES)], strategy=ShardedLike(device="cpu")).fit(make_model(), train, val)


def test_bad_arguments_are_rejected_early():
    with pytest.raises(ckptfn.ConfigError, match=r"\[0\]\.mode"):
        Checkpointing([{"metric_name": "val_loss", "mode": "minimum"}])
    with pytest.raises(ckptfn.ConfigError, match="save_on: a preemption save writes the config's Every strategies"):
        Checkpointing(STRATEGIES[:1], save_on="SIGTERM")
    with pytest.raises(ckptfn.ConfigError, match=r"save_on\[0\]: 'SIGFOO' is not a signal of this platform"):
        Checkpointing(STRATEGIES, save_on=["SIGFOO"])
    remote = Checkpointing(STRATEGIES, dirpath="s3://bucket/run")  # a URL: an object store (tests/remote)
    assert remote.dirpath == "s3://bucket/run" and remote.dirpath / "last.ckpt" == "s3://bucket/run/last.ckpt"


def test_importing_ckptfn_does_not_import_lightning():
    code = "import sys, ckptfn; assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- several processes -----------------------------------------------------------------------


class RankReport(lightning.Callback):
    def __init__(self, directory) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        state = trainer.checkpoint_callback.state.to_dict()
        (self.directory / f"state{trainer.global_rank}.json").write_text(json.dumps(state))


class RankSkewedModel(TinyModel):
    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_loss", (self.net(x) - y).pow(2).mean() + 10 * self.global_rank)  # differs per rank, not synced


def test_under_ddp_only_global_rank_zero_writes_and_all_ranks_decide_alike(tmp_path, monkeypatch):
    writes = tmp_path / "writes.log"

    def spying_write(*args, **kwargs):
        with open(writes, "a") as log:
            log.write(f"{os.getpid()}\n")
        return write_snapshot(*args, **kwargs)

    monkeypatch.setattr(ckptfn.io.write, "write_snapshot", spying_write)  # inherited by the forked ranks
    train, val = loaders()
    callback = Checkpointing([Strategy("val_loss"), Every(1, filename="last.ckpt")], dirpath=tmp_path / "run")
    torch.manual_seed(0)
    fit = trainer(3, [callback, RankReport(tmp_path)], strategy="ddp_fork", devices=2)
    fit.fit(RankSkewedModel(), train, val)
    writers = writes.read_text().split()
    assert len(writers) == 3 and len(set(writers)) == 1 and int(writers[0]) != os.getpid()
    states = [json.loads((tmp_path / f"state{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] == states[1]  # rank 1 decided from rank 0's metrics
    assert states[0]["strategies"][0]["best"] < 10
    assert callback.state.to_dict()["strategies"] == states[0]["strategies"]  # the main process read the files
