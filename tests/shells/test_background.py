"""Asynchronous saving: snapshots, one background writer, failures, flushing, staging buffers, CRC32 fast path."""

from __future__ import annotations

import collections
import contextvars
import functools
import io
import logging
import pathlib
import subprocess
import sys
import textwrap
import threading
import time
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfn
from ckptfn import AsyncExecutor, CheckpointManager, CheckpointWriteError, MetricWarning, PayloadError, Strategy
from ckptfn.io.staging import StagingBuffers
from ckptfn.io.write import serialization_context
from ckptfn.core.commit import roll_back
from ckptfn.io.write import write_snapshot
from ckptfn.io.fs import FileSystem
from ckptfn.core.naming import archived_of

from tests.faults import FailingFS
from tests.strategies import runs

LOSS = [{"metric_name": "val_loss", "filename": "best_loss.pt"}]
TWO = LOSS + [{"metric_name": "val_corr", "mode": "max", "filename": "best_corr.pt"}]
REPO = pathlib.Path(__file__).resolve().parents[2]


class GatedFS(FileSystem):
    """The real file system, except that the writer stops at ``point`` until the test opens ``gate``."""

    def __init__(self, point: str = "create") -> None:
        self.point = point
        self.gate = threading.Event()
        self.reached = threading.Event()

    def _hold(self, point: str) -> None:
        if point == self.point:
            self.reached.set()
            if not self.gate.wait(timeout=60):
                raise TimeoutError("the test never opened the gate")

    def create(self, path):
        self._hold("create")
        return super().create(path)

    def write(self, raw, data):
        self._hold("write")
        return super().write(raw, data)

    def fsync(self, raw):
        self._hold("fsync")
        return super().fsync(raw)


class TimingFS(FileSystem):
    """Records when each write starts (create) and ends (directory fsync); sleeps in fsync to widen overlaps."""

    def __init__(self, sleep: float = 0.05) -> None:
        self.sleep = sleep
        self.intervals: list[list[float]] = []
        self.active = 0
        self.most_active = 0

    def create(self, path):
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.intervals.append([time.monotonic(), None])
        return super().create(path)

    def fsync(self, raw):
        time.sleep(self.sleep)
        return super().fsync(raw)

    def fsync_dir(self, path):
        super().fsync_dir(path)
        self.intervals[-1][1] = time.monotonic()
        self.active -= 1


def use_fs(monkeypatch, fs, module=ckptfn.io.write) -> None:
    monkeypatch.setattr(module, "write_snapshot", functools.partial(write_snapshot, fs=fs))


def payload(epoch: int) -> dict:
    return {
        "model": collections.OrderedDict(w=torch.full((3, 4), float(epoch)), b=torch.arange(4.0) + epoch),
        "optimizer": {"step": epoch, "groups": [{"lr": 0.1 * (epoch + 1), "params": [0, 1]}]},
        "epoch": epoch,
    }


def assert_same(loaded, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert type(loaded) is type(expected) and loaded.dtype == expected.dtype
        assert torch.equal(loaded, expected)
    elif isinstance(expected, dict):
        assert type(loaded) is type(expected) and list(loaded) == list(expected)
        for key in expected:
            assert_same(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(loaded) is type(expected) and len(loaded) == len(expected)
        for a, b in zip(loaded, expected):
            assert_same(a, b)
    else:
        assert loaded == expected


# --- the snapshot: later mutation never leaks into a save ------------------------------------


def test_a_payload_mutated_right_after_update_returns_is_saved_with_the_pre_mutation_values(tmp_path, monkeypatch):
    fs = GatedFS("create")  # the background write cannot even start before the test has mutated everything
    use_fs(monkeypatch, fs)
    manager = CheckpointManager(tmp_path, LOSS, async_save=True)
    data = payload(1)
    expected = payload(1)
    (path,) = manager.update({"val_loss": 0.5}, data, 1)
    data["model"]["w"].add_(100)  # the training loop moves on: in-place tensor updates ...
    data["model"]["b"][0] = -1
    data["optimizer"]["step"] = 99  # ... and changes to the plain parts, at every depth
    data["optimizer"]["groups"][0]["lr"] = 42.0
    data["optimizer"]["groups"][0]["params"].append(7)
    data["epoch"] = 2
    fs.gate.set()
    manager.wait()
    state_dict, metadata = ckptfn.load_checkpoint(path)
    assert_same(state_dict, expected)
    assert metadata["epoch"] == 1


def test_update_returns_while_the_write_is_still_running(tmp_path, monkeypatch):
    fs = GatedFS("create")
    use_fs(monkeypatch, fs)
    manager = CheckpointManager(tmp_path, LOSS, async_save=True)
    (path,) = manager.update({"val_loss": 0.5}, payload(0), 0)
    assert fs.reached.wait(timeout=60) and not path.exists()  # the worker is inside the write, held
    assert manager.best_values == {"best_loss.pt": 0.5}  # decided at once
    fs.gate.set()
    manager.wait()
    assert ckptfn.read_metadata(path)["epoch"] == 0


def test_a_bad_payload_fails_in_update_itself_and_commits_nothing(tmp_path):
    manager = CheckpointManager(tmp_path, LOSS, async_save=True)
    with pytest.raises(PayloadError, match=r"payload\['fn'\]"):
        manager.update({"val_loss": 0.5}, {"fn": print}, 0)
    assert manager.best_values == {"best_loss.pt": None} and not manager._writer.pending
    manager.update({"val_loss": 0.7}, payload(1), 1)
    manager.close()
    assert ckptfn.read_metadata(tmp_path / "best_loss.pt")["epoch"] == 1


# --- background failures ---------------------------------------------------------------------


@pytest.mark.parametrize("surfaces_on", ["update", "wait", "close", "exit"])
def test_a_background_failure_surfaces_on_the_next_call_and_rolls_the_best_back(tmp_path, monkeypatch, surfaces_on, caplog):
    manager = CheckpointManager(tmp_path, LOSS, async_save=True)
    manager.update({"val_loss": 1.0}, payload(0), 0)
    manager.wait()
    failing = FailingFS("write", 1)
    use_fs(monkeypatch, failing)
    (path,) = manager.update({"val_loss": 0.5}, payload(1), 1)  # returns: the failure is in the future
    assert manager.best_values == {"best_loss.pt": 0.5}
    if surfaces_on == "update":  # an epoch that also improves, so it has to wait for the failed save
        with pytest.raises(CheckpointWriteError, match="No space left on device"):
            manager.update({"val_loss": 0.4}, payload(2), 2)
    elif surfaces_on == "exit":
        with caplog.at_level(logging.ERROR, logger="ckptfn"), pytest.raises(KeyError):
            with manager:
                raise KeyError("the training loop's own error wins")
        assert "No space left on device" in caplog.text
    else:
        with pytest.raises(CheckpointWriteError, match="No space left on device"):
            getattr(manager, surfaces_on)()
    assert manager.best_values == {"best_loss.pt": 1.0}  # rolled back to the file
    assert ckptfn.read_metadata(path)["epoch"] == 0
    assert [op for op in failing.ops if op[0] == "create"]  # the failure really was in the background write
    if surfaces_on in ("update", "wait"):  # the next epoch retries, and 0.8 now beats the best
        monkeypatch.undo()
        assert [p.name for p in manager.update({"val_loss": 0.8}, payload(3), 3)] == ["best_loss.pt"]
        manager.close()
        assert ckptfn.read_metadata(path)["epoch"] == 3


def test_only_the_names_that_did_not_land_roll_back(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, TWO, async_save=True)
    manager.update({"val_loss": 1.0, "val_corr": 0.1}, payload(0), 0)
    manager.wait()
    use_fs(monkeypatch, FailingFS("replace", 1))  # best_loss.pt is published, then best_corr.pt fails
    manager.update({"val_loss": 0.5, "val_corr": 0.2}, payload(1), 1)
    with pytest.raises(CheckpointWriteError) as info:
        manager.wait()
    assert [p.name for p in info.value.published] == ["best_loss.pt"]
    assert manager.best_values == {"best_loss.pt": 0.5, "best_corr.pt": 0.1}  # exactly what the files hold
    assert manager.state.steps == 2


def test_an_epoch_without_saves_does_not_wait_for_the_save_in_flight(tmp_path, monkeypatch):
    fs = GatedFS("create")
    use_fs(monkeypatch, fs)
    manager = CheckpointManager(tmp_path, LOSS, async_save=True)
    manager.update({"val_loss": 0.5}, payload(0), 0)
    assert manager.update({"val_loss": 0.9}, payload(1), 1) == []  # would hang here if it waited
    with pytest.warns(MetricWarning):
        assert manager.update({}, payload(2), 2) == []
    fs.gate.set()
    manager.close()
    assert manager.state.steps == 3


# --- flushing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["wait", "close", "with"])
def test_wait_close_and_leaving_a_with_block_block_until_the_file_is_on_disk(tmp_path, monkeypatch, how):
    fs = GatedFS("fsync")
    use_fs(monkeypatch, fs)
    with CheckpointManager(tmp_path, LOSS, async_save=True) as manager:
        (path,) = manager.update({"val_loss": 0.5}, payload(4), 4)
        assert fs.reached.wait(timeout=60)
        assert not path.exists()
        threading.Timer(0.1, fs.gate.set).start()  # opened only while the main thread is blocked below
        if how == "wait":
            manager.wait()
        elif how == "close":
            manager.close()
        if how != "with":
            assert path.exists() and not manager._writer.pending
    state_dict, metadata = ckptfn.load_checkpoint(path)
    assert_same(state_dict, payload(4))
    with pytest.raises(RuntimeError, match="closed"):
        manager.update({"val_loss": 0.1}, payload(5), 5)


def test_synchronous_managers_have_the_same_interface(tmp_path):
    with CheckpointManager(tmp_path, LOSS) as manager:
        (path,) = manager.update({"val_loss": 0.5}, payload(0), 0)
        assert path.exists()
        manager.wait()
    manager.close()  # idempotent


CHILD = textwrap.dedent(
    """
    import functools, logging, sys, time
    import torch, ckptfn, ckptfn.io.write
    from ckptfn.io.write import write_snapshot
    from ckptfn.io.fs import FileSystem
    from tests.faults import FailingFS

    class SlowFS(FileSystem):
        def fsync(self, raw):
            time.sleep(1.0)  # still writing when the main thread reaches its end
            return super().fsync(raw)

    logging.basicConfig(level=logging.INFO)
    fs = FailingFS("write", 1) if sys.argv[2] == "fail" else SlowFS()
    ckptfn.io.write.write_snapshot = functools.partial(write_snapshot, fs=fs)
    manager = ckptfn.CheckpointManager(sys.argv[1], [{"metric_name": "val_loss"}], async_save=True)
    manager.update({"val_loss": 0.5}, {"w": torch.arange(1000.0)}, 3)
    print("pending at exit:", manager._writer.pending, flush=True)
    """
)


def test_a_process_that_exits_normally_with_a_pending_save_leaves_a_complete_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), "slow"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "pending at exit: True" in result.stdout
    state_dict, metadata = ckptfn.load_checkpoint(tmp_path / "best_val_loss.pt")
    assert torch.equal(state_dict["w"], torch.arange(1000.0)) and metadata["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_val_loss.pt"]  # no temporary file left


def test_a_background_failure_at_exit_is_logged(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), "fail"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "background checkpoint save failed before exit" in result.stderr
    assert "No space left on device" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing partial under any name


# --- one save in flight ----------------------------------------------------------------------


def test_consecutive_saves_never_overlap_and_each_file_holds_its_own_epoch(tmp_path, monkeypatch):
    fs = TimingFS(sleep=0.05)  # the next snapshot is copied while the previous save fsyncs
    use_fs(monkeypatch, fs)
    strategy = [{"metric_name": "val_loss", "filename": "best.pt", "overwrite": False}]
    with CheckpointManager(tmp_path, strategy, async_save=True) as manager:
        data = payload(0)
        for epoch in range(6):
            for tensor in data["model"].values():
                tensor.fill_(float(epoch))  # the same tensors, changed in place, as in training
            data["epoch"] = epoch
            manager.update({"val_loss": 1.0 - epoch / 10}, data, epoch)
    assert fs.most_active == 1
    starts_and_ends = [time for interval in fs.intervals for time in interval]
    assert len(fs.intervals) == 6 and starts_and_ends == sorted(starts_and_ends)
    versions = [tmp_path / "best.pt"] + [p for p in tmp_path.iterdir() if archived_of(p.name, "best.pt")]
    seen = set()
    for path in versions:
        state_dict, metadata = ckptfn.load_checkpoint(path)
        epoch = metadata["epoch"]
        assert state_dict["epoch"] == epoch and torch.equal(state_dict["model"]["w"], torch.full((3, 4), float(epoch)))
        seen.add(epoch)
    assert seen == set(range(6))


# --- staging buffers -------------------------------------------------------------------------


def test_staging_buffers_are_reused_while_sizes_match_and_reallocated_when_they_change():
    buffers = StagingBuffers()
    first = buffers.snapshot({"a": torch.zeros(4, 4), "b": torch.zeros(8), "step": 1})
    storages = buffers.storages
    assert [s.nbytes() for s in storages] == [64, 32]
    assert first["a"].untyped_storage().data_ptr() == storages[0].data_ptr()
    second = buffers.snapshot({"a": torch.ones(2, 8), "b": torch.ones(8), "step": 2})  # same bytes per storage
    assert all(new is old for new, old in zip(buffers.storages, storages))
    assert second["a"].untyped_storage().data_ptr() == storages[0].data_ptr() and second["a"].shape == (2, 8)
    third = buffers.snapshot({"a": torch.ones(5, 4), "b": torch.ones(8), "c": torch.ones(1)})
    assert buffers.storages[0] is not storages[0] and buffers.storages[0].nbytes() == 80  # re-allocated
    assert buffers.storages[1] is storages[1]  # the unchanged one is kept
    assert len(buffers.storages) == 3 and torch.equal(third["c"], torch.ones(1))
    buffers.snapshot({"a": torch.ones(5, 4)})
    assert len(buffers.storages) == 1  # buffers no longer needed are freed


def test_the_async_writer_reuses_its_buffers_from_save_to_save(tmp_path):
    with AsyncExecutor() as writer:
        state = ckptfn.init(Strategy("val_loss"))
        for epoch in range(3):
            state, actions = ckptfn.step(state, {"val_loss": 1.0 - epoch / 10}, epoch)
            writer.submit(actions, payload(epoch), tmp_path, state=state)
            if epoch == 0:
                storages = writer.buffers.storages
            assert all(new is old for new, old in zip(writer.buffers.storages, storages))
        assert [p.name for p in writer.wait()] == ["best_val_loss.pt"]
    assert_same(ckptfn.load_checkpoint(tmp_path / "best_val_loss.pt")[0], payload(2))


def test_a_snapshot_keeps_layout_sharing_types_and_plain_parts():
    base = torch.arange(24.0).reshape(4, 6)
    weight = torch.nn.Parameter(torch.randn(3, 2))
    data = collections.OrderedDict(
        base=base,
        view=base[1:, ::2],  # offset and strides into the same storage
        alias=base,  # the same object twice
        weight=weight,
        grad=torch.ones(2, requires_grad=True),
        ints=torch.arange(5, dtype=torch.int16),
        sparse=torch.eye(3).to_sparse(),  # not plain: deep-copied
        plain={"names": ["a", "b"], "size": torch.Size([2, 3]), "blob": bytearray(b"xy")},
    )
    data._metadata = {"": {"version": 1}}  # what Module.state_dict() carries
    snap = StagingBuffers().snapshot(data)
    assert type(snap) is collections.OrderedDict and snap._metadata == {"": {"version": 1}}
    assert snap["view"].untyped_storage().data_ptr() == snap["base"].untyped_storage().data_ptr()
    assert snap["view"].storage_offset() == 6 and snap["view"].stride() == (6, 2)
    assert snap["alias"] is snap["base"]
    assert type(snap["weight"]) is torch.nn.Parameter and snap["weight"].requires_grad
    assert snap["grad"].requires_grad and snap["ints"].dtype == torch.int16
    for key in ("base", "view", "weight", "grad", "ints"):
        assert torch.equal(snap[key].detach(), data[key].detach())
    assert snap["sparse"].is_sparse and snap["sparse"] is not data["sparse"]
    base.zero_()
    data["sparse"]._values().zero_()
    data["plain"]["names"].append("c")
    data["plain"]["blob"][0] = 0
    data._metadata[""]["version"] = 2
    assert torch.equal(snap["view"], torch.arange(24.0).reshape(4, 6)[1:, ::2])
    assert torch.equal(snap["sparse"].to_dense(), torch.eye(3))
    assert snap["plain"] == {"names": ["a", "b"], "size": torch.Size([2, 3]), "blob": bytearray(b"xy")}
    assert snap._metadata == {"": {"version": 1}}
    buffer = io.BytesIO()
    torch.save(snap, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()


tensors = st.builds(
    lambda shape, dtype, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.bfloat16]),
    st.integers(0, 2**16),
)
payloads = st.recursive(
    st.one_of(tensors, st.integers(), st.text(max_size=3), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=60)
@given(st.lists(payloads, min_size=1, max_size=3))
def test_a_snapshot_saves_exactly_what_the_original_saves(sequence):
    buffers = StagingBuffers()  # one set of buffers through a sequence of differently shaped payloads
    for data in sequence:
        snap = buffers.snapshot(data)
        original, copied = io.BytesIO(), io.BytesIO()
        torch.save(data, original)
        torch.save(snap, copied)
        assert_same(torch.load(io.BytesIO(copied.getvalue()), weights_only=True), data)
        assert len(copied.getvalue()) == len(original.getvalue())


# --- roll_back -------------------------------------------------------------------------------


@given(runs(), st.data())
def test_roll_back_takes_exactly_the_named_strategies_from_the_disk(run, data):
    config, _, history = run
    believed, _ = ckptfn.scan(ckptfn.init(config), history)
    on_disk, _ = ckptfn.scan(ckptfn.init(config), history[: data.draw(st.integers(0, len(history)))])
    names = data.draw(st.sets(st.sampled_from([s.filename for s in config.strategies])))
    rolled = roll_back(believed, on_disk, names)
    assert rolled.config == config and rolled.steps == believed.steps
    for strategy, mine, disk, result in zip(config.strategies, believed.bests, on_disk.bests, rolled.bests):
        assert result == (disk if strategy.filename in names else mine)


# --- the AsyncExecutor for users of execute --------------------------------------------------


def test_the_executor_warns_about_skips_and_raises_a_failure_on_the_next_submit(tmp_path, monkeypatch):
    use_fs(monkeypatch, FailingFS("fsync"))
    state = ckptfn.init([Strategy("val_loss"), Strategy("val_corr", mode="max", on_missing="warn")])
    with AsyncExecutor() as writer:
        state, actions = ckptfn.step(state, {"val_loss": 0.5}, 0)
        with pytest.warns(MetricWarning, match="val_corr is missing"):
            assert [p.name for p in writer.submit(actions, payload(0), tmp_path, state=state)] == ["best_val_loss.pt"]
        state, actions = ckptfn.step(state, {"val_loss": 0.4, "val_corr": 0.1}, 1)
        with pytest.raises(CheckpointWriteError, match="No space left on device"):
            writer.submit(actions, payload(1), tmp_path, state=state)
        assert not writer.pending  # the failed save was collected; the new one was not started
        monkeypatch.undo()
        writer.submit(actions, payload(1), tmp_path, state=state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_val_corr.pt", "best_val_loss.pt"]
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(actions, payload(1), tmp_path, state=state)


# --- the CRC32 fast path ---------------------------------------------------------------------


def crcs_valid(path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return archive.testzip() is None


@pytest.mark.parametrize("async_save", [False, True])
def test_checksums_false_skips_crc32_for_this_manager_only(tmp_path, async_save):
    fast = CheckpointManager(tmp_path / "fast", LOSS, async_save=async_save, checksums=False)
    normal = CheckpointManager(tmp_path / "normal", LOSS, async_save=async_save)
    for manager in (fast, normal):
        manager.update({"val_loss": 0.5}, payload(2), 2)
        manager.close()
    assert not crcs_valid(tmp_path / "fast" / "best_loss.pt")
    assert crcs_valid(tmp_path / "normal" / "best_loss.pt")
    assert_same(ckptfn.load_checkpoint(tmp_path / "fast" / "best_loss.pt")[0], payload(2))  # loads all the same
    assert torch.serialization.get_crc32_options()  # nothing changed for the rest of the process


def test_a_save_without_crc32_in_flight_does_not_affect_a_concurrent_save(tmp_path, monkeypatch):
    fs = GatedFS("write")  # the background save stops in the middle of torch.save
    use_fs(monkeypatch, fs)
    with AsyncExecutor(checksums=False) as writer:
        state, actions = ckptfn.step(ckptfn.init(Strategy("val_loss")), {"val_loss": 0.5}, 0)
        writer.submit(actions, payload(0), tmp_path, state=state)
        assert fs.reached.wait(timeout=60)
        torch.save(payload(0), tmp_path / "concurrent.pt")  # meanwhile, on the training thread
        fs.gate.set()
    assert crcs_valid(tmp_path / "concurrent.pt")
    assert not crcs_valid(tmp_path / "best_val_loss.pt")


def test_the_background_save_honours_the_callers_torch_serialization_settings(tmp_path):
    def save_with_crc32_off():
        torch.serialization.set_crc32_options(False)  # in this context only
        with AsyncExecutor() as writer:
            state, actions = ckptfn.step(ckptfn.init(Strategy("val_loss")), {"val_loss": 0.5}, 0)
            writer.submit(actions, payload(0), tmp_path, state=state)

    contextvars.copy_context().run(save_with_crc32_off)
    assert not crcs_valid(tmp_path / "best_val_loss.pt")  # as a synchronous save in that context would be
    assert torch.serialization.get_crc32_options()


def test_serialization_context_refuses_a_torch_with_process_global_settings(monkeypatch):
    monkeypatch.setattr(ckptfn.io.torch_internals, "crc32_setting_is_per_context", lambda: False)
    with pytest.raises(NotImplementedError, match="process-global"):
        serialization_context(checksums=False)
    with pytest.raises(NotImplementedError):
        CheckpointManager("unused", LOSS, checksums=False)
    assert serialization_context(checksums=True).run(torch.serialization.get_crc32_options)
