"""What ``ModelCheckpoint`` users rely on, with ``Checkpointing`` and a real ``lightning.Trainer``:
``ckpt_path="last"``/``"best"``, the attributes, ``save_weights_only``, the loggers'
``after_save_checkpoint`` (real MLflow and offline W&B runs), ``on_saved``, and step/time
periods decided after training batches."""

from __future__ import annotations

import json
import os
import types
import warnings

import pytest
import torch

lightning = pytest.importorskip("lightning", reason="the Lightning tests need the 'lightning' extra (pip install 'ckptfn[test]')")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import ckptfn  # noqa: E402
import ckptfn.integrations.lightning as ckptfn_lightning  # noqa: E402
from ckptfn import Every, Strategy  # noqa: E402
from ckptfn.core.naming import archived_of  # noqa: E402
from ckptfn.integrations.lightning import Checkpointing  # noqa: E402
from tests.integrations.test_lightning import STRATEGIES, Recorder, TinyModel, loaders, make_model, oracle, trainer  # noqa: E402
from tests.integrations.test_lightning_steps import long_epochs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")

WATCHED = ["best_loss.ckpt", "best_mae.ckpt", "best_score.ckpt", "last.ckpt"]


class Start(lightning.Callback):
    """Where training starts: epoch, global step, and the callback's state."""

    def on_train_start(self, trainer, pl_module):
        callback = trainer.checkpoint_callback
        self.epoch, self.global_step, self.state = trainer.current_epoch, trainer.global_step, callback.state


# --- ckpt_path="last" and "best" ----------------------------------------------------------------


def test_fit_ckpt_path_last_resumes_from_the_last_file_at_its_epoch_and_step_with_its_bests(tmp_path):
    train, val = loaders()
    whole = Checkpointing(STRATEGIES, dirpath=tmp_path / "whole")
    trainer(5, [whole]).fit(make_model(), train, val)
    part = Checkpointing(STRATEGIES, dirpath=tmp_path / "run")
    trainer(3, [part]).fit(make_model(), train, val)
    after_three = part.state
    resumed, start, recorder = Checkpointing(STRATEGIES, dirpath=tmp_path / "run"), Start(), Recorder()
    fit = trainer(5, [resumed, start, recorder])
    fit.fit(make_model(), train, val, ckpt_path="last")
    assert fit.ckpt_path == str(tmp_path / "run" / "last.ckpt")
    assert (start.epoch, start.global_step) == (3, 12)  # 4 batches per epoch
    assert start.state == after_three  # the bests came back
    assert [epoch for epoch, _ in recorder.metrics] == [3, 4]
    assert resumed.state.bests == whole.state.bests  # as if it had never stopped
    for name in ("best_loss.ckpt", "best_score.ckpt", "last.ckpt"):
        mine = torch.load(tmp_path / "run" / name, weights_only=True)
        theirs = torch.load(tmp_path / "whole" / name, weights_only=True)
        assert (mine["epoch"], mine["global_step"]) == (theirs["epoch"], theirs["global_step"])
        assert all(torch.equal(mine["state_dict"][k], theirs["state_dict"][k]) for k in theirs["state_dict"])


def test_ckpt_path_last_with_a_default_dirpath_and_no_logger(tmp_path):
    train, val = loaders()
    trainer(2, [Checkpointing(STRATEGIES)], default_root_dir=tmp_path).fit(make_model(), train, val)
    start = Start()
    fit = trainer(3, [Checkpointing(STRATEGIES), start], default_root_dir=tmp_path)
    fit.fit(make_model(), train, val, ckpt_path="last")
    assert fit.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt") and start.epoch == 2


def test_ckpt_path_last_without_an_every_strategy_fails_loudly_and_writes_nothing(tmp_path):
    train, val = loaders()
    trainer(2, [Checkpointing(STRATEGIES[:1], dirpath=tmp_path)]).fit(make_model(), train, val)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    callback = Checkpointing(STRATEGIES[:1], dirpath=tmp_path)
    message = r'ckpt_path="last"\): this Checkpointing has no ckptfn.Every strategy.*Every\(1, filename="last.ckpt"\)'
    with pytest.raises(ValueError, match=message + r'.*ckpt_path=".*best_loss.ckpt"'):
        trainer(4, [callback]).fit(make_model(), train, val, ckpt_path="last")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_ckpt_path_last_before_the_first_last_file_says_so_and_starts_from_the_beginning(tmp_path):
    train, val = loaders()
    start = Start()
    with pytest.warns(UserWarning, match=r'ckpt_path="last"\): there is no last checkpoint at .*last.ckpt yet') as caught:
        trainer(1, [Checkpointing(STRATEGIES, dirpath=tmp_path), start]).fit(make_model(), train, val, ckpt_path="last")
    assert (start.epoch, start.global_step) == (0, 0)
    assert not [w for w in caught if "HINT: Set `ModelCheckpoint" in str(w.message)]  # not Lightning's misleading hint
    assert sorted(os.listdir(tmp_path)) == sorted(WATCHED)


def test_ckpt_path_best_loads_the_first_metric_strategy_file_also_in_a_new_process(tmp_path):
    train, val = loaders()
    first = Checkpointing(STRATEGIES, dirpath=tmp_path)
    trainer(4, [first]).fit(make_model(), train, val)
    best_epoch = ckptfn.read_metadata(tmp_path / "best_loss.ckpt")["epoch"]
    fresh = trainer(1, [Checkpointing(STRATEGIES, dirpath=tmp_path)])  # a callback that never trained
    fresh.validate(make_model(), val, ckpt_path="best", verbose=False)
    assert fresh.ckpt_path == str(tmp_path / "best_loss.ckpt") == first.best_model_path
    start = Start()
    fit = trainer(best_epoch + 2, [Checkpointing(STRATEGIES, dirpath=tmp_path), start])
    fit.fit(make_model(), train, val, ckpt_path="best")  # resuming from the best, for what it is worth
    assert start.epoch == best_epoch + 1


def test_ckpt_path_best_without_a_best_file_or_metric_strategy_fails_loudly(tmp_path):
    train, val = loaders()
    with pytest.raises(ValueError, match=r'ckpt_path="best"\): there is no best checkpoint at .*best_loss.ckpt yet'):
        trainer(1, [Checkpointing(STRATEGIES, dirpath=tmp_path)]).fit(make_model(), train, val, ckpt_path="best")
    with pytest.raises(ValueError, match=r'ckpt_path="best"\): this Checkpointing has no metric strategy'):
        trainer(1, [Checkpointing([Every(1)], dirpath=tmp_path)]).validate(make_model(), val, ckpt_path="best")


def test_ckpt_path_last_still_resolves_for_model_checkpoint_alone(tmp_path):
    train, val = loaders()
    trainer(2, [ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(make_model(), train, val)
    fit = trainer(3, [ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    fit.fit(make_model(), train, val, ckpt_path="last")
    assert fit.ckpt_path == str(tmp_path / "last.ckpt")


# --- the attributes ModelCheckpoint users read ----------------------------------------------------


def test_the_attributes_match_model_checkpoint_watching_the_same_metric(tmp_path):
    """Oracle: ModelCheckpoint(monitor="val_loss", save_top_k=3) in the same fit sees the same metrics."""
    train, val = long_epochs(16)
    strategies = [Strategy("val_loss", top_k=3, filename="best.ckpt"), Strategy("val_score", mode="max"),
                  Every(1, filename="last.ckpt")]
    ours = Checkpointing(strategies, dirpath=tmp_path / "ours")
    theirs = ModelCheckpoint(dirpath=tmp_path / "theirs", monitor="val_loss", save_top_k=3)
    trainer(6, [ours, theirs], val_check_interval=8).fit(make_model(), train, val)

    assert (ours.monitor, ours.mode, ours.save_top_k) == (theirs.monitor, theirs.mode, theirs.save_top_k)
    assert sorted(v.item() for v in ours.best_k_models.values()) == sorted(v.item() for v in theirs.best_k_models.values())
    assert ours.best_model_score.item() == theirs.best_model_score.item()
    assert ours.kth_value.item() == theirs.kth_value.item()
    assert ours.current_score.item() == theirs.current_score.item()
    assert ours.best_k_models[ours.kth_best_model_path].item() == ours.kth_value.item()
    assert ours.best_model_path == str(tmp_path / "ours" / "best.ckpt")
    assert ours.last_model_path == str(tmp_path / "ours" / "last.ckpt")
    for path, value in ours.best_k_models.items():  # every path is a file holding that value
        metadata = ckptfn.read_metadata(path)
        assert metadata["global_step"] == torch.load(path, weights_only=True)["global_step"]
        assert any(entry.get("value") == value.item() for entry in metadata["saves"])

    per_strategy = ours.bests_by_filename
    assert list(per_strategy) == ["best.ckpt", "best_val_score.pt"]
    score = per_strategy["best_val_score.pt"]
    assert (score.monitor, score.mode, score.save_top_k) == ("val_score", "max", 1)
    assert score.best_model_score.item() == ours.best_values["best_val_score.pt"]
    assert score.best_k_models == {} or list(score.best_k_models) == [score.best_model_path] == [score.kth_best_model_path]
    assert per_strategy["best.ckpt"].best_model_path == ours.best_model_path


def test_the_attributes_before_any_save_are_those_of_a_fresh_model_checkpoint():
    ours = Checkpointing([Strategy("val_acc", mode="max", top_k=2)])
    theirs = ModelCheckpoint(monitor="val_acc", mode="max", save_top_k=2)
    for name in ("monitor", "mode", "save_top_k", "best_model_path", "best_model_score", "best_k_models",
                 "kth_best_model_path", "current_score", "last_model_path"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.kth_value.item() == theirs.kth_value.item() == -float("inf")
    periodic_only = Checkpointing([Every(1)])
    assert (periodic_only.monitor, periodic_only.best_model_score, periodic_only.best_k_models) == (None, None, {})
    assert periodic_only.bests_by_filename == {}


# --- save_weights_only ------------------------------------------------------------------------------


def test_save_weights_only_writes_the_model_and_metadata_that_both_loaders_read(tmp_path):
    train, val = loaders()
    full = Checkpointing(STRATEGIES[:1], dirpath=tmp_path / "full")
    light = Checkpointing(STRATEGIES, dirpath=tmp_path / "light", save_weights_only=True)
    trainer(3, [full]).fit(make_model(), train, val)
    trainer(3, [light]).fit(make_model(), train, val)
    for name in WATCHED:
        path = tmp_path / "light" / name
        raw = torch.load(path, weights_only=True)
        assert not {"optimizer_states", "lr_schedulers", "callbacks"} & set(raw)
        assert {"state_dict", "epoch", "global_step", "hyper_parameters", "metadata"} <= set(raw)
        model = TinyModel.load_from_checkpoint(path)
        assert model.hparams.hidden == 8
        assert all(torch.equal(tensor, raw["state_dict"][key]) for key, tensor in model.state_dict().items())
        payload, metadata = ckptfn.load_checkpoint(path)
        assert set(payload) == set(raw) - {"metadata"} and metadata["manager_state"]["format"] == "ckptfn.state/1"
    assert os.path.getsize(tmp_path / "light" / "best_loss.ckpt") < os.path.getsize(tmp_path / "full" / "best_loss.ckpt")
    assert ckptfn.restore_from_directory(light.config, tmp_path / "light").bests == light.state.bests
    with pytest.raises(KeyError, match="contains only the model"):  # Lightning's own refusal to resume from it
        trainer(4, [Checkpointing(STRATEGIES, dirpath=tmp_path / "light")]).fit(make_model(), train, val, ckpt_path="last")


def test_save_weights_only_must_be_a_bool():
    with pytest.raises(TypeError, match="save_weights_only"):
        Checkpointing(STRATEGIES, save_weights_only="yes")


# --- on_saved -----------------------------------------------------------------------------------


def test_on_saved_hears_every_name_of_every_committed_write_as_the_pure_core_decided(tmp_path):
    train, val = loaders()
    events, recorder = [], Recorder()
    callback = Checkpointing(STRATEGIES, dirpath=tmp_path, on_saved=events.append)
    trainer(4, [callback, recorder]).fit(make_model(), train, val)
    _, per_epoch = oracle(callback.config, recorder.metrics, recorder.global_steps)
    expected = [(a.filename, a.epoch) for actions in per_epoch for a in actions]
    assert [(e.name, e.epoch) for e in events] == expected
    assert {e.kind for e in events} == {"best", "periodic"}
    for event in events:
        assert event.global_step == recorder.global_steps[event.epoch] and event.bytes > 0
        assert event.path == str(tmp_path / event.name) and event.path in event.paths
    last = [e for e in events if e.epoch == 3]
    assert len({e.paths for e in last}) == 1  # one write: the names of the epoch together


def test_a_failing_on_saved_hook_warns_and_training_goes_on(tmp_path, caplog):
    def broken(event):
        raise RuntimeError("tracker down")

    train, val = loaders()
    callback = Checkpointing(STRATEGIES, dirpath=tmp_path, on_saved=[broken])
    trainer(2, [callback]).fit(make_model(), train, val)
    assert "tracker down" in caplog.text and callback.state.bests[-1].epoch == 1


# --- loggers: after_save_checkpoint ---------------------------------------------------------------


def test_mlflow_logger_with_log_model_uploads_every_file(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="needs mlflow (mlflow-skinny)")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store is opt-in since MLflow 3.7
    uri = (tmp_path / "mlruns").as_uri()
    logger = MLFlowLogger(tracking_uri=uri, log_model=True)
    callback = Checkpointing(STRATEGIES, dirpath=tmp_path / "run")
    train, val = loaders()
    trainer(4, [callback], logger=logger).fit(make_model(), train, val)

    client = MlflowClient(tracking_uri=uri)
    folders = {entry.path for entry in client.list_artifacts(logger.run_id)}
    assert folders == {name.removesuffix(".ckpt") for name in WATCHED}  # MLFlowLogger: one folder per file stem
    download = tmp_path / "download"
    for name in WATCHED:
        stem = name.removesuffix(".ckpt")
        assert {e.path for e in client.list_artifacts(logger.run_id, stem)} == {
            f"{stem}/{name}", f"{stem}/metadata.yaml", f"{stem}/aliases.txt"}
        local = client.download_artifacts(logger.run_id, stem, str(download))
        assert (download / stem / name).read_bytes() == (tmp_path / "run" / name).read_bytes()  # the final files
        aliases = (download / stem / "aliases.txt").read_text()
        assert ("'best'" in aliases) == (name == "best_loss.ckpt"), (name, aliases)
        assert local
    metadata = (download / "best_loss" / "metadata.yaml").read_text()
    assert "monitor: val_loss" in metadata and f"score: {callback.best_values['best_loss.ckpt']}" in metadata


def test_wandb_logger_with_log_model_all_uploads_each_save_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="needs wandb")
    from lightning.pytorch.loggers import WandbLogger

    from tests.integrations.test_trackers import md5_b64, wandb_artifacts, wandb_records

    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true",
                       "WANDB_DATA_DIR": tmp_path / "data", "WANDB_CACHE_DIR": tmp_path / "cache",
                       "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_ARTIFACT_DIR": tmp_path / "artifacts"}.items():
        monkeypatch.setenv(key, str(value))
    events = []
    # WandbLogger refuses offline=True with log_model; WANDB_MODE=offline keeps the run local
    logger = WandbLogger(log_model="all", save_dir=tmp_path, project="ckptfn-test")
    callback = Checkpointing(STRATEGIES, dirpath=tmp_path / "run", on_saved=events.append)
    train, val = loaders()
    try:
        trainer(4, [callback], logger=logger).fit(make_model(), train, val)
    finally:
        wandb.finish()
    artifacts = wandb_artifacts(wandb_records(tmp_path))
    logged = [json.loads(a.metadata)["original_filename"] for a in artifacts]
    saved = [e.name for e in events]
    assert sorted(logged) == sorted(saved)  # every name of every save, once
    finals = {}
    for artifact, name in zip(artifacts, logged):
        assert artifact.type == "model" and [entry.path for entry in artifact.manifest.contents] == ["model.ckpt"]
        finals[name] = artifact
    for name in WATCHED:  # the last upload of each name is the file on disk
        assert finals[name].manifest.contents[0].digest == md5_b64(tmp_path / "run" / name)
    assert "best" in finals["best_loss.ckpt"].aliases
    metadata = json.loads(finals["best_loss.ckpt"].metadata)
    assert metadata["CheckpointingForLoggers"]["monitor"] == "val_loss"


class Counting(lightning.pytorch.loggers.CSVLogger):
    """A real logger that records what ``after_save_checkpoint`` is given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen = []

    def after_save_checkpoint(self, checkpoint_callback):
        self.seen.append((checkpoint_callback.best_model_path, sorted(checkpoint_callback.best_k_models)))


def test_loggers_hear_of_every_committed_write_with_every_file(tmp_path):
    logger = Counting(tmp_path / "logs")
    callback = Checkpointing(STRATEGIES, dirpath=tmp_path / "run")
    train, val = loaders()
    trainer(3, [callback], logger=logger).fit(make_model(), train, val)
    assert len(logger.seen) == 3  # one committed write per epoch
    best_path, files = logger.seen[-1]
    assert best_path == callback.best_model_path
    kept = [n for n in os.listdir(tmp_path / "run") if not archived_of(n, "best_mae.ckpt")]
    assert files == sorted(str(tmp_path / "run" / name) for name in kept)


def test_loggers_and_on_saved_hear_nothing_of_a_failed_write(tmp_path, monkeypatch):
    from ckptfn.io.write import write_snapshot
    from tests.faults import FailingFS

    calls = []

    def failing_second_write(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:
            return write_snapshot(*args, fs=FailingFS("write", 0), **kwargs)
        return write_snapshot(*args, **kwargs)

    monkeypatch.setattr(ckptfn.io.write, "write_snapshot", failing_second_write)
    logger, events = Counting(tmp_path / "logs"), []
    callback = Checkpointing(STRATEGIES, dirpath=tmp_path / "run", on_saved=events.append)
    with pytest.raises(ckptfn.CheckpointWriteError):
        trainer(3, [callback], logger=logger).fit(make_model(), *loaders())
    assert len(logger.seen) == 1 and {e.epoch for e in events} == {0}


# --- several processes -----------------------------------------------------------------------------


def test_under_ddp_step_periods_between_validations_are_written_once_by_rank_zero(tmp_path, monkeypatch):
    from ckptfn.io.write import write_snapshot
    from tests.integrations.test_lightning import RankReport

    writes = tmp_path / "writes.log"

    def spying_write(*args, **kwargs):
        with open(writes, "a") as log:
            log.write(f"{os.getpid()}\n")
        return write_snapshot(*args, **kwargs)

    monkeypatch.setattr(ckptfn.io.write, "write_snapshot", spying_write)  # inherited by the forked ranks
    train, val = long_epochs(16)  # 8 batches per rank and epoch
    callback = Checkpointing([Strategy("val_loss"), Every(n_steps=3, filename="last.ckpt")], dirpath=tmp_path / "run")
    fit = trainer(2, [callback, RankReport(tmp_path)], strategy="ddp_fork", devices=2)
    fit.fit(make_model(), train, val)
    writers = writes.read_text().split()
    assert len(set(writers)) == 1 and int(writers[0]) != os.getpid()
    states = [json.loads((tmp_path / f"state{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] == states[1]
    # last.ckpt after the batches of steps 3, 6, 9, 12, 15; val_loss at the epoch ends (steps 8, 16)
    best_again = states[0]["strategies"][0]["best_global_step"] == 16
    assert len(writers) == 5 + 1 + best_again
    assert ckptfn.read_metadata(tmp_path / "run" / "last.ckpt")["global_step"] == 15


# --- step and time periods between validations -------------------------------------------------------


def periodic_steps(events, name="last.ckpt"):
    return [e.global_step for e in events if e.name == name]


@pytest.mark.parametrize(
    "options, decided_at",
    [
        ({}, [40, 80]),  # validation once per epoch: decisions at each epoch's end
        ({"val_check_interval": 20}, [20, 40, 60, 80]),  # decisions after each validation
        ({"limit_val_batches": 0}, [40, 80]),  # no validation: each epoch's end
        ({"check_val_every_n_epoch": 2}, [80]),  # after the validation of every 2nd epoch
    ],
)
def test_every_n_steps_saves_between_validations_once_per_global_step(tmp_path, options, decided_at):
    """Like ModelCheckpoint(every_n_train_steps=10): last.ckpt every 10 steps, whatever the
    validations; the metric strategy is judged only at the decisions, never on training metrics."""
    train, val = long_epochs(40)
    events = []
    config = ckptfn.Config([Strategy("val_loss"), Every(n_steps=10, filename="last.ckpt")], on_missing="warn")
    callback = Checkpointing(config, dirpath=tmp_path, on_saved=events.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckptfn.MetricWarning)  # no val_loss without validation
        trainer(2, [callback], **options).fit(make_model(), train, val)
    assert periodic_steps(events) == [10, 20, 30, 40, 50, 60, 70, 80]
    best_steps = periodic_steps(events, "best_val_loss.pt")
    assert set(best_steps) <= set(decided_at) and (best_steps or options.get("limit_val_batches") == 0)
    writes = {}
    for event in events:
        writes.setdefault(event.global_step, set()).add(event.paths)
    assert all(len(paths) == 1 for paths in writes.values())  # one write per global step
    last = ckptfn.read_metadata(tmp_path / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 80)
    assert callback.state.bests[1].global_step == 80


def test_every_n_steps_between_validations_resumes_mid_epoch(tmp_path):
    train, val = long_epochs(40)
    config = ckptfn.Config([Strategy("val_loss"), Every(n_steps=10, filename="last.ckpt")], on_missing="warn")
    with pytest.warns(ckptfn.MetricWarning, match="val_loss is missing"):  # stopped before any validation
        trainer(1, [Checkpointing(config, dirpath=tmp_path)], max_steps=35).fit(make_model(), train, val)
    assert ckptfn.read_metadata(tmp_path / "last.ckpt")["global_step"] == 30
    start, events = Start(), []
    resumed = Checkpointing(config, dirpath=tmp_path, on_saved=events.append)
    trainer(2, [resumed, start]).fit(make_model(), train, val, ckpt_path="last")
    assert (start.epoch, start.global_step) == (0, 30)
    assert periodic_steps(events) == [40, 50, 60, 70, 80]


def test_every_seconds_counts_from_the_start_of_fit_and_saves_between_validations(tmp_path, monkeypatch):
    """A clock that reads the global step as seconds: Every(seconds=15) saves at steps 15, 30, 45, ...
    (the first after 15 seconds of training, like train_time_interval), not at the first batch."""
    clock = {"now": 0.0}

    class Tick(lightning.Callback):  # runs before Checkpointing, which Lightning puts last
        def on_train_batch_end(self, trainer, *args):
            clock["now"] = float(trainer.global_step)

    monkeypatch.setattr(ckptfn_lightning, "time", types.SimpleNamespace(monotonic=lambda: clock["now"]))
    train, val = long_epochs(40)
    events = []
    callback = Checkpointing([Strategy("val_loss"), Every(seconds=15, filename="last.ckpt")], dirpath=tmp_path,
                             on_saved=events.append)
    trainer(2, [Tick(), callback]).fit(make_model(), train, val)
    assert periodic_steps(events) == [15, 30, 45, 60, 75]
    assert periodic_steps(events, "best_val_loss.pt")[0] == 40


def test_between_validations_runs_only_with_step_or_time_periods(tmp_path, monkeypatch):
    calls, original = [], ckptfn_lightning.step_between_validations
    monkeypatch.setattr(ckptfn_lightning, "step_between_validations",
                        lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs))
    train, val = long_epochs(8)
    trainer(1, [Checkpointing(STRATEGIES, dirpath=tmp_path)]).fit(make_model(), train, val)
    assert calls == []


def test_step_between_validations_changes_only_the_step_and_time_periods():
    state = ckptfn.init([Strategy("val_loss"), Every(2), Every(n_steps=5, filename="s.pt"), Every(seconds=9, filename="t.pt")])
    state, _ = ckptfn.step(state, {"val_loss": 0.5}, 0, global_step=3, now=0.0)
    new, actions = ckptfn_lightning.step_between_validations(state, 0, global_step=5, now=10.0)
    assert [(type(a).__name__, a.filename) for a in actions] == [("Periodic", "s.pt"), ("Periodic", "t.pt")]
    assert new.bests[:2] == state.bests[:2] and new.steps == state.steps  # not a validation: not counted
    whole, _ = ckptfn.step(state, {"val_loss": 0.5}, 0, global_step=5, now=10.0)
    assert new.bests[2:] == whole.bests[2:]  # the same verdicts as the full step's
