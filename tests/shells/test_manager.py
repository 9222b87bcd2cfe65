"""CheckpointManager: the seed's scenarios, failures, resume, warnings."""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import shutil
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfn
from ckptfn import CheckpointManager, CheckpointWriteError, Config, ConfigError, MetricWarning, Strategy
from ckptfn.io.write import write_snapshot
from ckptfn.core.naming import archived_of

from tests.faults import FailingFS
from tests.strategies import finite_values

THREE = [
    {"metric_name": "val_loss", "mode": "min", "filename": "best_loss.pt"},
    {"metric_name": "loss_components.concordance", "mode": "min", "filename": "best_concordance.pt"},
    {"metric_name": "val_residual_spearman", "mode": "max", "filename": "best_corr.pt"},
]


def payload(epoch):
    return {"model": {"w": torch.full((4,), float(epoch))}, "optimizer": {"step": epoch}}


def metrics(loss, concordance, corr):
    return {"val_loss": loss, "loss_components": {"concordance": concordance, "mse": loss / 2}, "val_residual_spearman": corr}


# 1. + 2. multi-metric, loss component tracked independently


def test_different_metrics_save_different_files_at_the_right_epochs(tmp_path):
    manager = CheckpointManager(tmp_path, THREE)
    history = [metrics(1.0, 0.5, 0.1), metrics(0.8, 0.6, 0.05), metrics(0.9, 0.4, 0.3), metrics(0.7, 0.45, 0.2)]
    written = [[p.name for p in manager.update(m, payload(e), e)] for e, m in enumerate(history)]
    assert written == [
        ["best_loss.pt", "best_concordance.pt", "best_corr.pt"],
        ["best_loss.pt"],
        ["best_concordance.pt", "best_corr.pt"],
        ["best_loss.pt"],
    ]
    assert manager.best_values == {"best_loss.pt": 0.7, "best_concordance.pt": 0.4, "best_corr.pt": 0.3}
    # the concordance file was chosen by the component alone, at epoch 2, while the total loss got worse
    state_dict, meta = CheckpointManager.load_checkpoint(tmp_path / "best_concordance.pt")
    assert meta["epoch"] == 2 and state_dict["optimizer"] == {"step": 2}
    assert ckptfn.read_metadata(tmp_path / "best_loss.pt")["epoch"] == 3


# 3. file integrity


def test_saved_files_hold_the_full_payload_and_reload_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(tmp_path, THREE[:1])
    (path,) = manager.update({"val_loss": 0.5}, {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, 3)
    state_dict, meta = manager.load_checkpoint(path)
    clone = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    clone.load_state_dict(state_dict["model"])
    x = torch.randn(10, 3)
    assert torch.equal(clone(x), model(x))
    assert state_dict["optimizer"]["state"][0]["momentum_buffer"].equal(optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert meta["saves"][0]["value"] == 0.5 and meta["epoch"] == 3
    assert ckptfn.restore(manager.config, meta["manager_state"]) == manager.state


# 4. configuration flexibility


@pytest.mark.parametrize(
    "configs, expected",
    [
        (None, []),
        ([], []),
        ({"enabled": False, "strategies": THREE}, []),
        (Strategy("val_loss"), ["best_val_loss.pt"]),
        ([Strategy("val_loss"), Strategy("val_residual_spearman", mode="max")], ["best_val_loss.pt", "best_val_residual_spearman.pt"]),
        (Config([Strategy("val_loss", filename="x.pt")]), ["x.pt"]),
        ({"metric_name": "val_loss"}, ["best_val_loss.pt"]),
        (THREE, ["best_loss.pt", "best_concordance.pt", "best_corr.pt"]),
    ],
)
def test_configuration_forms(tmp_path, configs, expected):
    manager = CheckpointManager(tmp_path, configs)
    assert [p.name for p in manager.update(metrics(1.0, 0.5, 0.1), payload(0), 0)] == expected
    assert sorted(os.listdir(tmp_path)) == sorted(expected) if expected else not tmp_path.exists() or os.listdir(tmp_path) == []


def test_invalid_configurations_are_rejected_with_the_key_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^\[1\]\.mode: 'maximum' is not one of 'min', 'max'$"):
        CheckpointManager(tmp_path, [THREE[0], {"metric_name": "val_residual_spearman", "mode": "maximum"}])
    with pytest.raises(ConfigError, match=r"unknown key 'metirc_name'"):
        CheckpointManager(tmp_path, [{"metirc_name": "val_loss"}])


# 5. improvement detection in both modes


@settings(max_examples=30)
@given(st.lists(finite_values, min_size=1, max_size=12), st.sampled_from(["min", "max"]))
def test_improvement_detection_through_the_manager(tmp_path_factory, values, mode):
    directory = tmp_path_factory.mktemp("mode")
    manager = CheckpointManager(directory, [Strategy("m", mode=mode)])
    best, saved_at = None, []
    for epoch, value in enumerate(values):
        if manager.update({"m": value}, {}, epoch):
            saved_at.append(epoch)
        if best is None or (value < best if mode == "min" else value > best):
            best = value
            assert saved_at[-1] == epoch
    assert manager.best_values == {"best_m.pt": best}


# 6. concurrent strategies do not interfere


def test_concurrent_strategies_match_their_solo_runs(tmp_path):
    history = [metrics(1.0, 0.5, 0.1), metrics(0.8, 0.6, 0.05), metrics(0.9, 0.4, 0.3), metrics(0.7, 0.45, 0.2)]
    together = CheckpointManager(tmp_path / "all", THREE)
    together_saves = [{p.name for p in together.update(m, payload(e), e)} for e, m in enumerate(history)]
    for config in THREE:
        alone = CheckpointManager(tmp_path / config["filename"], [config])
        alone_saves = [{p.name for p in alone.update(m, payload(e), e)} for e, m in enumerate(history)]
        assert alone_saves == [s & {config["filename"]} for s in together_saves]
        assert alone.best_values[config["filename"]] == together.best_values[config["filename"]]


# 7. overwrite control


def test_overwrite_control(tmp_path):
    manager = CheckpointManager(tmp_path, [{"metric_name": "val_loss", "filename": "best_loss.pt"},
                                           {"metric_name": "val_residual_spearman", "mode": "max", "filename": "best_corr.pt", "overwrite": False}])
    for epoch, corr in enumerate([0.1, 0.2, 0.3]):
        manager.update({"val_loss": 1.0 - corr, "val_residual_spearman": corr}, payload(epoch), epoch)
    names = os.listdir(tmp_path)
    assert names.count("best_loss.pt") == 1 and sum(n.startswith("best_loss") for n in names) == 1
    assert sum(archived_of(n, "best_corr.pt") for n in names) == 2 and "best_corr.pt" in names


# failures


def fail_writes(monkeypatch, op, at=0):
    monkeypatch.setattr(ckptfn.io.write, "write_snapshot", functools.partial(write_snapshot, fs=FailingFS(op, at)))


def test_a_failed_write_keeps_the_state_and_retries_next_epoch(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, THREE)
    manager.update(metrics(1.0, 0.5, 0.1), payload(0), 0)
    before_state, before_bytes = manager.state, (tmp_path / "best_loss.pt").read_bytes()
    with monkeypatch.context() as patch:
        fail_writes(patch, "write", 2)
        with pytest.raises(CheckpointWriteError):
            manager.update(metrics(0.5, 0.4, 0.2), payload(1), 1)
    assert manager.state == before_state
    assert (tmp_path / "best_loss.pt").read_bytes() == before_bytes
    assert [p.name for p in manager.update(metrics(0.6, 0.45, 0.15), payload(2), 2)] == [
        "best_loss.pt", "best_concordance.pt", "best_corr.pt"]


def test_a_failure_after_some_names_were_published_rebuilds_bests_from_the_files(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, THREE)
    manager.update(metrics(1.0, 0.5, 0.1), payload(0), 0)
    with monkeypatch.context() as patch:
        fail_writes(patch, "replace", 1)  # best_loss.pt is published, then the second name fails
        with pytest.raises(CheckpointWriteError) as info:
            manager.update(metrics(0.5, 0.4, 0.2), payload(1), 1)
    assert [p.name for p in info.value.published] == ["best_loss.pt"]
    assert manager.best_values == {"best_loss.pt": 0.5, "best_concordance.pt": 0.5, "best_corr.pt": 0.1}
    # a worse loss next epoch must not replace the better file that did land
    assert [p.name for p in manager.update(metrics(0.7, 0.45, 0.15), payload(2), 2)] == [
        "best_concordance.pt", "best_corr.pt"]
    assert ckptfn.read_metadata(tmp_path / "best_loss.pt")["epoch"] == 1


# resume


def test_resume_never_overwrites_a_better_checkpoint_with_a_worse_one(tmp_path):
    first = CheckpointManager(tmp_path, THREE)
    for epoch, m in enumerate([metrics(1.0, 0.5, 0.1), metrics(0.5, 0.4, 0.3)]):
        first.update(m, payload(epoch), epoch)
    resumed = CheckpointManager(tmp_path, THREE, resume=True)
    assert resumed.best_values == first.best_values
    assert resumed.update(metrics(0.6, 0.45, 0.2), payload(2), 2) == []  # all worse: nothing replaced
    assert ckptfn.read_metadata(tmp_path / "best_loss.pt")["epoch"] == 1


def test_resume_with_changed_or_missing_files(tmp_path):
    CheckpointManager(tmp_path, THREE).update(metrics(1.0, 0.5, 0.1), payload(0), 0)
    os.remove(tmp_path / "best_concordance.pt")
    os.remove(tmp_path / "best_corr.pt")  # never write into a checkpoint in place: names share inodes
    (tmp_path / "best_corr.pt").write_bytes(b"torn")
    changed = [THREE[0] | {"mode": "max"}, THREE[1], THREE[2]]
    for resume in (True, None):  # resuming, and the default: refused, naming the file
        with pytest.raises(ckptfn.CheckpointError, match=r"cannot judge the checkpoint .*best_corr.pt"):
            CheckpointManager(tmp_path, changed, resume=resume)
    os.remove(tmp_path / "best_corr.pt")  # what the error says to do
    resumed = CheckpointManager(tmp_path, changed, resume=True)
    assert resumed.best_values == {"best_loss.pt": None, "best_concordance.pt": None, "best_corr.pt": None}


def test_without_resume_existing_checkpoints_get_one_warning(tmp_path, caplog):
    CheckpointManager(tmp_path, THREE).update(metrics(1.0, 0.5, 0.1), payload(0), 0)
    with caplog.at_level(logging.WARNING, logger="ckptfn"):
        CheckpointManager(tmp_path, [THREE[0], THREE[2] | {"overwrite": False}], resume=False)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "best_loss.pt (epoch 0, val_loss=1.0) will be replaced (overwrite=True)" in record.message
    assert "best_corr.pt (epoch 0, val_residual_spearman=0.1) will be archived (overwrite=False)" in record.message
    assert "Leave resume out (or pass resume=True)" in record.message


def test_by_default_a_new_manager_judges_against_an_earlier_runs_checkpoints(tmp_path, caplog):
    """A new run (or a restart that forgot resume) never replaces a better checkpoint with a worse one."""
    CheckpointManager(tmp_path, THREE).update(metrics(0.4866, 0.5, 0.1), payload(8), 8)
    with caplog.at_level(logging.WARNING, logger="ckptfn"):
        again = CheckpointManager(tmp_path, THREE)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "judging against the checkpoints in" in record.message and "resume=False" in record.message
    assert [p.name for p in again.update(metrics(0.6643, 0.6, 0.05), payload(1), 1)] == []  # all worse
    assert ckptfn.read_metadata(tmp_path / "best_loss.pt")["saves"][0]["value"] == 0.4866
    fresh = CheckpointManager(tmp_path, THREE, resume=False)  # the explicit opt-in
    assert [p.name for p in fresh.update(metrics(0.6643, 0.6, 0.05), payload(1), 1)][0] == "best_loss.pt"


def test_state_dict_round_trip(tmp_path):
    manager = CheckpointManager(tmp_path, THREE)
    manager.update(metrics(1.0, 0.5, 0.1), payload(0), 0)
    other = CheckpointManager(tmp_path / "other", THREE)
    other.load_state_dict(manager.state_dict())
    assert other.state == manager.state
    assert "val_loss (min): best 1 at epoch 0 -> " in manager.summary()
    assert other.summary().count("\n") == 2
    assert CheckpointManager(tmp_path / "x", THREE).summary() == "no checkpoints yet (3 strategies)"


# skip warnings


def test_missing_and_non_finite_metrics_warn_once_per_strategy_and_reason(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, ckptfn.Config.from_mapping({"strategies": THREE, "on_missing": "warn"}))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, logger="ckptfn"):
        warnings.simplefilter("always")
        for epoch in range(4):
            manager.update({"val_loss": float("nan"), "val_residual_spearman": 0.1 * epoch}, payload(epoch), epoch)
        manager.update({"val_loss": float("inf"), "val_residual_spearman": 0.0}, payload(4), 4)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, MetricWarning))
    assert len(messages) == 2
    assert messages[0].startswith("loss_components.concordance is missing at epoch 0")
    assert messages[1].startswith("val_loss is not finite (nan) at epoch 0")
    debug = [r.message for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 8  # 4 repeats x 2 strategies


# one-off saves


def test_save_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, THREE)
    path = manager.save_checkpoint({"w": torch.ones(2)}, "final.pt", metadata={"epoch": 9, "note": "done", "tags": ("a",)})
    assert path == tmp_path / "final.pt"
    state_dict, meta = manager.load_checkpoint(path)
    assert meta["epoch"] == 9 and meta["note"] == "done" and meta["tags"] == ["a"] and meta["saves"] == []
    elsewhere = manager.save_checkpoint({}, tmp_path / "sub" / "x.pt")
    assert elsewhere == tmp_path / "sub" / "x.pt" and elsewhere.exists()
    with pytest.raises(ValueError, match="'saves'"):
        manager.save_checkpoint({}, "bad.pt", metadata={"saves": []})
    assert not (tmp_path / "bad.pt").exists()
    # overwrite=False archives the earlier file under its save time and returns the given name
    again = manager.save_checkpoint({"w": torch.zeros(2)}, "final.pt", overwrite=False, metadata={"epoch": 10})
    assert again == path and manager.load_checkpoint(path)[1]["epoch"] == 10
    archived = [n for n in os.listdir(tmp_path) if archived_of(n, "final.pt")]
    assert len(archived) == 1 and manager.load_checkpoint(tmp_path / archived[0])[1]["epoch"] == 9


# --- a best this process cannot read (issue 13) ---------------------------------------------------


def test_a_best_the_process_cannot_read_is_refused_not_taken_for_absent(tmp_path):
    """Permission denied at resume: refused naming the file. The child runs without the capabilities
    that let root read any file (``setpriv``), so the permission bits apply to it."""
    import subprocess
    import sys

    from tests.reliability.common import ROOT

    CheckpointManager(tmp_path, [{"metric_name": "val_loss"}]).update({"val_loss": 0.1}, {"w": 1}, 0)
    (tmp_path / "best_val_loss.pt").chmod(0o000)
    child = textwrap.dedent(
        """
        import sys, ckptfn
        for resume in (None, True):
            try:
                ckptfn.CheckpointManager(sys.argv[1], [{"metric_name": "val_loss"}], resume=resume)
                print("accepted", resume)
            except ckptfn.CheckpointError as error:
                print("refused", resume, "best_val_loss.pt" in str(error), "Permission" in str(error))
        """
    )
    command = [sys.executable, "-c", child, str(tmp_path)]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=120)
    finally:
        (tmp_path / "best_val_loss.pt").chmod(0o600)
    assert done.stdout.split("\n")[:2] == ["refused None True True", "refused True True True"], done.stderr[-1500:]
    assert ckptfn.read_metadata(tmp_path / "best_val_loss.pt")["saves"][0]["value"] == 0.1  # untouched


def test_verify_full_refuses_a_best_with_a_flipped_bit_that_torch_would_load(tmp_path):
    """torch.load never checks the zip CRC32s: a bit flip in tensor data loads silently. verify="full"
    refuses to trust such a best when resuming, naming the file and the damaged record."""
    import struct
    import zipfile

    CheckpointManager(tmp_path, [{"metric_name": "val_loss"}]).update({"val_loss": 0.5}, {"w": torch.ones(64)}, 0)
    path = tmp_path / "best_val_loss.pt"
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, record.header_offset + 26)  # the local header's own
    start = record.header_offset + 30 + name_length + extra_length
    data[start + 5] ^= 0x10  # one bit of the tensor's bytes
    path.write_bytes(bytes(data))
    assert not torch.equal(ckptfn.load_checkpoint(path)[0]["w"], torch.ones(64))  # torch loads it silently
    assert CheckpointManager(tmp_path, [{"metric_name": "val_loss"}]).best_values == {"best_val_loss.pt": 0.5}
    with pytest.raises(ckptfn.CheckpointError, match=r"best_val_loss.pt.*CRC32"):
        CheckpointManager(tmp_path, [{"metric_name": "val_loss"}], verify="full")


def test_resume_false_says_that_earlier_top_k_members_will_go(tmp_path, caplog):
    config = [ckptfn.Strategy("acc", mode="max", top_k=2)]
    first = CheckpointManager(tmp_path, config)
    for epoch, value in enumerate((0.5, 0.6)):
        first.update({"acc": value}, {}, epoch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_acc-epoch=0.pt", "best_acc.pt"]
    with caplog.at_level(logging.WARNING, logger="ckptfn"):
        fresh = CheckpointManager(tmp_path, config, resume=False)
    assert "the top-k members best_acc-epoch=0.pt will be deleted" in caplog.text
    fresh.update({"acc": 0.1}, {}, 0)  # a fresh start: its own top-k, the earlier members go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_acc.pt"]


def test_the_log_says_saved_before_removed_and_no_checkpoints_yet_once(tmp_path, caplog):
    config = [ckptfn.Strategy("acc", mode="max", top_k=2), ckptfn.Strategy("val_loss", overwrite=False, keep=1)]
    with caplog.at_level(logging.INFO, logger="ckptfn"):
        manager = CheckpointManager(tmp_path, config, resume=True)
        for epoch, (acc, loss) in enumerate([(0.5, 0.9), (0.6, 0.8), (0.7, 0.7)]):
            manager.update({"acc": acc, "val_loss": loss}, {}, epoch)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("no checkpoints yet (2 strategies)" in line for line in lines) == 1
    assert not any("never saved" in line for line in lines)
    last = lines[-4:]  # the third epoch: two saves, then what they let go
    assert [line.split(":")[0] for line in last[:2]] == ["saved best_acc.pt", "saved best_val_loss.pt"]
    removed = sorted(line.split(":")[0] for line in last[2:])
    assert removed[0] == "removed best_acc-epoch=0.pt" and removed[1].startswith("removed best_val_loss_")
    assert "acc 0.7000 (was 0.6000, kept as best_acc-epoch=1.pt) at epoch 2" in last[0]
