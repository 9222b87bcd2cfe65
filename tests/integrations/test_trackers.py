"""``ckptfn.integrations.trackers`` against the real libraries, offline: a W&B offline run read
back from its transaction log, an MLflow file store read back with ``MlflowClient``."""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import logging
import pathlib
import re
import struct
import sys
import time

import pytest
import torch
from hypothesis import given, strategies as st

import ckptfn
from ckptfn import Config, Every, Strategy
from ckptfn.core.events import Saved
from ckptfn.integrations.trackers import MLflowTracker, WandbTracker, alias_of, artifact_name, mlflow_key, tracker

#: val_loss keeps its two best (a top-k member besides the best), "val/acc" has a slash in its
#: name (W&B alias and MLflow key), and an Every saves every second epoch
STRATEGIES = [Strategy("val_loss", top_k=2), Strategy("val/acc", mode="max"), Every(2)]
METRICS = [(0.9, 0.5), (0.7, 0.6), (0.8, 0.55), (0.6, 0.7), (0.65, 0.65), (0.5, 0.65)]


def train(directory, config, hook=None, **manager_options):
    """Six epochs, 10 steps each; the manager and every ``Saved`` event, in order."""
    events = []
    hooks = [events.append] if hook is None else [hook, events.append]
    with ckptfn.CheckpointManager(directory, config, on_saved=hooks, **manager_options) as manager:
        for epoch, (loss, acc) in enumerate(METRICS):
            payload = {"w": torch.full((4,), float(epoch))}
            manager.update({"val_loss": loss, "val/acc": acc}, payload, epoch, global_step=10 * (epoch + 1))
    return manager, events


def last_best(events, metric_name):
    return [e for e in events if e.kind == "best" and e.metric_name == metric_name][-1]


# --- W&B: an offline run, read back from its .wandb transaction log ----------------------------

@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the W&B tests need the 'wandb' extra")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true",
                       "WANDB_DATA_DIR": tmp_path / "data", "WANDB_CACHE_DIR": tmp_path / "cache",
                       "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_ARTIFACT_DIR": tmp_path / "artifacts"}.items():
        monkeypatch.setenv(key, str(value))
    yield wandb
    wandb.finish()


def start_wandb(wandb, tmp_path):
    return wandb.init(project="ckptfn-test", dir=tmp_path, mode="offline")


def wandb_records(tmp_path, timeout=60.0):
    """The records of the offline run's ``run-<id>.wandb`` file: a LevelDB-style log (32 KiB
    blocks, 7-byte chunk headers: CRC32C, length, type) after the 7-byte W&B header, each record
    a ``wandb_internal_pb2.Record``. wandb 0.31 no longer ships a Python reader for it, and
    writes no ``wandb-summary.json`` offline.

    ``wandb.finish()`` returns before wandb-core has written the file (seen: only the header,
    for up to a second or two), so this waits for the run's ``exit`` record, its last."""
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = parse_wandb_log(pathlib.Path(path).read_bytes())
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.05)


def parse_wandb_log(data):
    """The complete records of a (possibly still growing) ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    if len(data) < 7:
        return []
    assert data[:4] == b":W&B" and data[4:6] == struct.pack("<H", 0xBEE1), data[:7]
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding at the end of a block
            position += block - position % block
            continue
        if position + 7 + length > len(data):  # a chunk still being written
            break
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_summary(records):
    """The run summary the records leave: every summary update, in order."""
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary["/".join(item.nested_key) if item.nested_key else item.key] = json.loads(item.value_json)
    return summary


def wandb_artifacts(records):
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]


def md5_b64(path):
    return base64.b64encode(hashlib.md5(pathlib.Path(path).read_bytes()).digest()).decode()


def test_an_offline_wandb_run_holds_the_bests_in_its_summary_and_every_save_as_an_artifact(wandb_offline, tmp_path):
    run = start_wandb(wandb_offline, tmp_path)
    run_id = run.id
    manager, events = train(tmp_path / "ckpt", STRATEGIES, WandbTracker())
    wandb_offline.finish()
    records = wandb_records(tmp_path)

    summary = wandb_summary(records)
    best_values = manager.best_values
    assert summary["best/val_loss"] == best_values["best_val_loss.pt"] == 0.5
    assert summary["best/val/acc"] == best_values["best_val_acc.pt"] == 0.7
    for metric in ("val_loss", "val/acc"):
        best = last_best(events, metric)
        assert (summary[f"best_epoch/{metric}"], summary[f"best_step/{metric}"]) == (best.epoch, best.global_step)

    artifacts = wandb_artifacts(records)
    assert {e.kind for e in events} == {"best", "top_k", "periodic"}
    assert len(artifacts) == len(events)  # one version per save, in order
    for artifact, event in zip(artifacts, events):
        assert artifact.name == f"{run_id}-{artifact_name(event.strategy)}" and artifact.type == "model"
        expected = {"best": {"latest", alias_of(event.metric_name)}, "top_k": {"latest"}, "periodic": {"latest"}}
        assert set(artifact.aliases) == expected[event.kind]
        metadata = json.loads(artifact.metadata)
        assert (metadata["name"], metadata["kind"], metadata["value"], metadata["epoch"], metadata["global_step"]) == (
            event.name, event.kind, event.value, event.epoch, event.global_step)
        (entry,) = artifact.manifest.contents
        assert (entry.path, entry.ref) == (event.name, pathlib.Path(event.path).absolute().as_uri())
    assert alias_of("val/acc") == "best-val_acc"

    # the last version that took each best alias is the file on disk now, byte for byte
    for filename, metric in (("best_val_loss.pt", "val_loss"), ("best_val_acc.pt", "val/acc")):
        holder = [a for a in artifacts if alias_of(metric) in a.aliases][-1]
        assert json.loads(holder.metadata)["value"] == best_values[filename]
        assert holder.manifest.contents[0].digest == md5_b64(tmp_path / "ckpt" / filename)
    periodic = [a for a in artifacts if a.name.endswith("-last.pt")]
    assert [json.loads(a.metadata)["epoch"] for a in periodic] == [1, 3, 5]


def test_upload_mode_copies_each_version_and_no_artifacts_mode_logs_only_the_summary(wandb_offline, tmp_path):
    start_wandb(wandb_offline, tmp_path)
    _, events = train(tmp_path / "up", [Strategy("val_loss")], WandbTracker(artifacts="upload"))
    train(tmp_path / "none", [Strategy("val/acc", mode="max")], WandbTracker(artifacts=None))
    wandb_offline.finish()
    records = wandb_records(tmp_path)
    artifacts = wandb_artifacts(records)
    assert [json.loads(a.metadata)["value"] for a in artifacts] == [e.value for e in events]  # val_loss only
    assert all(not a.manifest.contents[0].ref and a.manifest.contents[0].local_path for a in artifacts)
    assert artifacts[-1].manifest.contents[0].digest == md5_b64(tmp_path / "up" / "best_val_loss.pt")
    assert wandb_summary(records)["best/val/acc"] == 0.7


def test_config_trackers_wandb_logs_to_the_active_run(wandb_offline, tmp_path):
    start_wandb(wandb_offline, tmp_path)
    config = Config.from_mapping({"trackers": ["wandb"], "strategies": [{"metric_name": "val_loss"}]})
    manager, _ = train(tmp_path / "ckpt", config)
    wandb_offline.finish()
    records = wandb_records(tmp_path)
    assert wandb_summary(records)["best/val_loss"] == manager.best_values["best_val_loss.pt"]
    assert [set(a.aliases) for a in wandb_artifacts(records)][-1] == {"best-val_loss", "latest"}


def test_without_a_run_wandb_saves_are_a_warning_once_and_training_goes_on(wandb_offline, tmp_path, caplog):
    assert wandb_offline.run is None
    with caplog.at_level(logging.DEBUG, logger="ckptfn"):
        manager, events = train(tmp_path / "ckpt", [Strategy("val_loss")], WandbTracker())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "W&B" in r.getMessage()]
    assert len(events) == 4 and manager.best_values == {"best_val_loss.pt": 0.5}
    assert len(warnings) == 1 and "no active W&B run" in warnings[0] and "wandb.init()" in warnings[0]


def test_a_finished_wandb_run_given_explicitly_is_a_warning_once(wandb_offline, tmp_path, caplog):
    run = start_wandb(wandb_offline, tmp_path)
    wandb_offline.finish()
    with caplog.at_level(logging.WARNING, logger="ckptfn"):
        train(tmp_path / "ckpt", [Strategy("val_loss")], WandbTracker(run))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not take" in warnings[0]


# --- MLflow: a local file store, read back with MlflowClient -------------------------------------

@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the MLflow tests need the 'mlflow' extra")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store is opt-in since MLflow 3.7
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    yield mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


def artifact_files(client, run_id, path=""):
    """Every file under ``path`` of the run's artifacts, recursively."""
    files = []
    for info in client.list_artifacts(run_id, path or None):
        files.extend(artifact_files(client, run_id, info.path) if info.is_dir else [info.path])
    return sorted(files)


def test_an_mlflow_run_holds_every_best_as_metric_history_and_every_save_as_an_artifact(mlflow_store, tmp_path):
    with mlflow_store.start_run() as run:
        manager, events = train(tmp_path / "ckpt", STRATEGIES, MLflowTracker())
    client = mlflow_store.MlflowClient()
    run_id = run.info.run_id

    for metric in ("val_loss", "val/acc"):
        history = [(m.value, m.step) for m in client.get_metric_history(run_id, f"best/{metric}")]
        assert history == [(e.value, e.global_step) for e in events if e.kind == "best" and e.metric_name == metric]
    assert set(client.get_run(run_id).data.metrics) == {"best/val_loss", "best/val/acc"}  # periodic: no metric
    assert client.get_run(run_id).data.metrics["best/val_loss"] == manager.best_values["best_val_loss.pt"]

    files = artifact_files(client, run_id)
    assert files == sorted({f"checkpoints/{e.strategy}/{e.name}" for e in events})
    store = pathlib.Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    for filename in ("best_val_loss.pt", "best_val_acc.pt", "last.pt"):  # the latest upload of each name
        assert (store / "checkpoints" / filename / filename).read_bytes() == (tmp_path / "ckpt" / filename).read_bytes()
    member = next(e for e in events if e.kind == "top_k")
    assert f"checkpoints/best_val_loss.pt/{member.name}" in files


def test_mlflow_with_a_run_id_and_a_client_needs_no_active_run(mlflow_store, tmp_path):
    client = mlflow_store.MlflowClient()
    run_id = client.create_run("0").info.run_id
    config = [Strategy("f1@0.5", mode="max", filename="best_f1.pt")]
    hook = MLflowTracker(run_id, client=client, artifacts=False)
    with ckptfn.CheckpointManager(tmp_path / "ckpt", config, on_saved=hook) as m:
        for epoch, f1 in enumerate([0.2, 0.4, 0.3]):
            m.update({"f1@0.5": f1}, {"w": torch.zeros(1)}, epoch)  # no global step: the epoch is the step
    assert mlflow_store.active_run() is None
    key = mlflow_key("f1@0.5")
    assert key.startswith("best/f1_0.5-")
    assert [(x.value, x.step) for x in client.get_metric_history(run_id, key)] == [(0.2, 0), (0.4, 1)]
    assert client.list_artifacts(run_id) == []


def test_mlflow_logs_a_sharded_checkpoint_directory_whole(mlflow_store, tmp_path):
    directory = tmp_path / "best_val_loss.dcp"
    (directory / "sub").mkdir(parents=True)
    (directory / ".metadata").write_bytes(b"m")
    (directory / "sub" / "__0_0.distcp").write_bytes(b"shard")
    event = Saved("best_val_loss.dcp", "best_val_loss.pt", "best", "val_loss", "min", 0.3, None, 0, 7,
                  str(directory), [str(directory)], 6)
    with mlflow_store.start_run() as run:
        MLflowTracker()(event)
    files = artifact_files(mlflow_store.MlflowClient(), run.info.run_id)
    assert files == ["checkpoints/best_val_loss.pt/best_val_loss.dcp/.metadata",
                     "checkpoints/best_val_loss.pt/best_val_loss.dcp/sub/__0_0.distcp"]


def test_without_a_run_mlflow_saves_are_a_warning_once(mlflow_store, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ckptfn"):
        train(tmp_path / "ckpt", [Strategy("val_loss")], MLflowTracker())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no active MLflow run" in warnings[0]


# --- names, errors --------------------------------------------------------------------------------

def test_an_unknown_tracker_is_a_config_error_with_the_known_names(tmp_path):
    expected = "trackers: unknown tracker 'wandbb' (did you mean 'wandb'?); known trackers: mlflow, wandb"
    with pytest.raises(ckptfn.ConfigError, match=re.escape(expected)):
        ckptfn.CheckpointManager(tmp_path, {"trackers": ["wandbb"], "strategies": [{"metric_name": "val_loss"}]})
    with pytest.raises(ckptfn.ConfigError, match="unknown tracker 'comet'; known"):
        tracker("comet")
    with pytest.raises(ckptfn.ConfigError, match="artifacts: 'copy' is not one of"):
        tracker("wandb", artifacts="copy")
    with pytest.raises(ckptfn.ConfigError, match="name: expected a str holding '{filename}'"):
        tracker("wandb", name="{run}-{filename}")


@pytest.mark.parametrize("name, cls", [("wandb", "WandbTracker"), ("mlflow", "MLflowTracker")])
def test_a_tracker_whose_library_is_missing_says_which_extra_to_install(tmp_path, monkeypatch, name, cls):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if not installed
    message = re.escape(f"{cls} needs the {name} package: pip install 'ckptfn[{name}]'")
    with pytest.raises(ImportError, match=message):
        tracker(name)
    with pytest.raises(ImportError, match=message):  # at construction, before any training
        ckptfn.CheckpointManager(tmp_path, {"trackers": [name], "strategies": [{"metric_name": "val_loss"}]})


NAMES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=300)


@given(NAMES, NAMES)
def test_wandb_names_are_valid_and_never_merge_two_names(a, b):
    validate_artifact_name = pytest.importorskip("wandb.sdk.artifacts._validators").validate_artifact_name

    for name in (a, b):
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", artifact_name(name))
        assert validate_artifact_name(artifact_name(name)) == artifact_name(name)
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", alias_of(name))
    if a != b:  # a changed name carries the CRC32 of the original
        assert artifact_name(a) != artifact_name(b)


@given(NAMES)
def test_mlflow_keys_pass_mlflow_validation_and_valid_names_stay_as_they_are(name):
    _validate_metric_name = pytest.importorskip("mlflow.utils.validation")._validate_metric_name

    key = mlflow_key(name)
    _validate_metric_name(key)  # raises MlflowException if MLflow would refuse it
    parts = f"best/{name}".split("/")
    if re.fullmatch(r"[\w./ :-]+", name) and all(part not in ("", ".", "..") for part in parts) and len(name) <= 245:
        assert key == f"best/{name}"
    else:
        assert key != f"best/{name}" and len(key) <= 250
