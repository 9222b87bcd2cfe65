"""Sharded (DCP) checkpoint directories in one process: commit protocol, crash points, safe reading.

The same code runs on every rank in a distributed run (tests/shells/test_distributed.py);
here ``sharded=True`` drives it without a process group, so crash points can be
checked exhaustively and fast.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import pathlib
import pickle

import pytest
import torch

import ckptfn
from ckptfn import CheckpointError, CheckpointManager, CheckpointNotFoundError, ConfigError, PayloadError
from ckptfn.io.fs import FileSystem
from ckptfn.io.publish import sweep as recover
from ckptfn.io.write import commit_tree
from ckptfn.kit import Target
from ckptfn.core.naming import archived_of
from ckptfn.core.naming import temp_name as dcp_temp_name
from ckptfn.io.dcp import load_consolidated, read_sharded_metadata, write_shards


def new_temp_name(name: str) -> str:
    return dcp_temp_name(name, os.getpid(), socket.gethostname(), secrets.token_hex(6))

from tests.faults import Crash, RunsACommand

TWO = [
    {"metric_name": "val_loss", "filename": "best_loss.pt"},
    {"metric_name": "val_corr", "mode": "max", "filename": "best_corr.pt", "overwrite": False},
]


def payload(version: float) -> dict:
    return {"model": {"w": torch.full((3, 4), version), "b": torch.arange(4.0) + version}, "epoch": int(version)}


def hidden(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def versions_of(directory: pathlib.Path, filename: str) -> list[pathlib.Path]:
    return sorted(directory / n for n in os.listdir(directory) if archived_of(n, filename))


# --- the manager with sharded=True -------------------------------------------------------------


def test_sharded_true_writes_directories_that_load_whole_or_into_a_template_and_resume(tmp_path):
    manager = CheckpointManager(tmp_path, TWO, sharded=True)
    assert [p.name for p in manager.update({"val_loss": 0.5, "val_corr": 0.1}, payload(1.0), 0)] == [
        "best_loss.dcp",
        "best_corr.dcp",
    ]
    assert [p.name for p in manager.update({"val_loss": 0.6, "val_corr": 0.2}, payload(2.0), 1)] == ["best_corr.dcp"]
    whole, metadata = ckptfn.load_checkpoint(tmp_path / "best_loss.dcp")
    assert torch.equal(whole["model"]["w"], torch.full((3, 4), 1.0)) and whole["epoch"] == 1
    assert metadata == ckptfn.read_metadata(tmp_path / "best_loss.dcp")
    assert metadata["epoch"] == 0 and metadata["saves"][0]["value"] == 0.5
    template = {"model": {"w": torch.zeros(3, 4), "b": torch.zeros(4)}, "epoch": 0}
    loaded, _ = ckptfn.load_sharded(tmp_path / "best_corr.dcp", template)
    assert loaded is template and torch.equal(template["model"]["b"], torch.arange(4.0) + 2) and template["epoch"] == 2
    (archived,) = versions_of(tmp_path, "best_corr.dcp")  # overwrite=False kept epoch 0's tree
    assert ckptfn.read_metadata(archived)["epoch"] == 0
    resumed = CheckpointManager(tmp_path, TWO, resume=True)
    assert resumed.best_values == {"best_loss.pt": 0.5, "best_corr.pt": 0.2} and resumed.state == manager.state
    assert manager.save_checkpoint(payload(3.0), "last.pt").name == "last.dcp"
    assert ckptfn.load_checkpoint(tmp_path / "last.dcp")[0]["epoch"] == 3
    assert hidden(tmp_path) == []


def test_names_of_one_epoch_share_one_write_as_hard_linked_trees(tmp_path):
    CheckpointManager(tmp_path, TWO, sharded=True).update({"val_loss": 0.5, "val_corr": 0.1}, payload(1.0), 0)
    entries = sorted(os.listdir(tmp_path / "best_loss.dcp"))
    assert entries == sorted(os.listdir(tmp_path / "best_corr.dcp"))
    assert ".metadata" in entries and "ckptfn.json" in entries
    for entry in entries:
        assert os.path.samefile(tmp_path / "best_loss.dcp" / entry, tmp_path / "best_corr.dcp" / entry)


def test_keep_bounds_the_archived_trees_like_the_archived_files(tmp_path):
    manager = CheckpointManager(
        tmp_path, [{"metric_name": "val_corr", "mode": "max", "filename": "best_corr.pt", "overwrite": False, "keep": 2}], sharded=True
    )
    for epoch in range(4):
        manager.update({"val_corr": float(epoch)}, payload(float(epoch)), epoch)
    (archived,) = versions_of(tmp_path, "best_corr.dcp")  # the current tree plus one archived version
    assert committed(tmp_path, archived.name) == 2 and committed(tmp_path, "best_corr.dcp") == 3
    assert hidden(tmp_path) == []


class NoLinks(FileSystem):
    def link(self, source, target):
        raise OSError(errno.EPERM, "no hard links here (injected)")


def test_without_hard_links_the_other_names_are_copies(tmp_path):
    temp = write_shards(tmp_path, new_temp_name("best_loss.dcp"), payload(1.0))
    commit_tree(tmp_path, temp, [Target("best_loss.pt"), Target("best_corr.pt")], {"format": "ckptfn/1"}, fs=NoLinks())
    assert not os.path.samefile(tmp_path / "best_loss.dcp" / ".metadata", tmp_path / "best_corr.dcp" / ".metadata")
    assert torch.equal(load_consolidated(tmp_path / "best_corr.dcp")[0]["model"]["w"], torch.full((3, 4), 1.0))


def test_a_resumed_run_believes_the_newer_of_a_file_and_a_sharded_directory(tmp_path):
    CheckpointManager(tmp_path, TWO[:1]).update({"val_loss": 0.5}, payload(1.0), 0)  # best_loss.pt
    CheckpointManager(tmp_path, TWO[:1], sharded=True, resume=False).update({"val_loss": 0.7}, payload(2.0), 1)  # best_loss.dcp
    assert CheckpointManager(tmp_path, TWO[:1], resume=True).state.bests[0].value == 0.7  # newer, even if worse
    CheckpointManager(tmp_path, TWO[:1], resume=False).update({"val_loss": 0.9}, payload(3.0), 2)
    assert CheckpointManager(tmp_path, TWO[:1], resume=True).state.bests[0].value == 0.9


def test_strategies_whose_directories_would_clash_are_refused_before_writing(tmp_path):
    clashing = [{"metric_name": "a", "filename": "best.pt"}, {"metric_name": "b", "filename": "best.pth"}]
    with pytest.raises(ConfigError, match=r"^strategies\[1\]\.filename: 'best.pt' and 'best.pth' would both be saved as the sharded checkpoint 'best.dcp'"):
        CheckpointManager(tmp_path, clashing, sharded=True)  # known when the manager is built
    manager = CheckpointManager(tmp_path, clashing)  # sharded=None: only a sharded payload needs the directories
    assert manager.update({"a": 1.0, "b": 1.0}, payload(1.0), 0)  # a plain payload: files, no clash
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "best.pth"]


def test_an_unstorable_value_is_a_payload_error_and_nothing_is_left(tmp_path):
    manager = CheckpointManager(tmp_path, TWO, sharded=True)
    with pytest.raises(PayloadError, match=r"payload\['sched'\]\['fn'\]"):
        manager.update({"val_loss": 0.5, "val_corr": 0.1}, {**payload(1.0), "sched": {"fn": print}}, 0)
    assert os.listdir(tmp_path) == [] and manager.best_values == {"best_loss.pt": None, "best_corr.pt": None}


def test_missing_file_points_to_its_sharded_directory(tmp_path):
    CheckpointManager(tmp_path, TWO, sharded=True).update({"val_loss": 0.5, "val_corr": 0.1}, payload(1.0), 0)
    with pytest.raises(CheckpointNotFoundError, match=r"a sharded checkpoint is at .*best_loss\.dcp"):
        ckptfn.load_checkpoint(tmp_path / "best_loss.pt")
    with pytest.raises(CheckpointNotFoundError, match="no such sharded checkpoint"):
        ckptfn.load_sharded(tmp_path / "best_x.dcp", {})
    (tmp_path / "plain.dcp").mkdir()
    with pytest.raises(CheckpointError, match=r"not a complete torch.distributed.checkpoint directory \(no .metadata\)"):
        ckptfn.read_metadata(tmp_path / "plain.dcp")


# --- safe reading --------------------------------------------------------------------------------


def test_a_dcp_metadata_pickle_with_foreign_code_is_refused_and_never_runs(tmp_path):
    CheckpointManager(tmp_path, TWO[:1], sharded=True).update({"val_loss": 0.5}, payload(1.0), 0)
    marker = tmp_path / "pwned"
    (tmp_path / "best_loss.dcp" / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    with pytest.raises(CheckpointError, match=r"refused to unpickle \(posix.system is not allowed"):
        ckptfn.load_checkpoint(tmp_path / "best_loss.dcp")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        ckptfn.load_sharded(tmp_path / "best_loss.dcp", payload(0.0))
    assert not marker.exists()


def test_a_value_that_needs_unsafe_unpickling_is_refused_and_never_runs(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    tree = tmp_path / "evil.dcp"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"w": torch.zeros(2), "evil": RunsACommand(marker)}, checkpoint_id=tree)
    (tree / "ckptfn.json").write_text('{"format": "ckptfn/1", "epoch": 0}')
    with pytest.raises(CheckpointError, match=r"'evil' does not load with torch.load\(weights_only=True\)"):
        ckptfn.load_checkpoint(tree)
    assert not marker.exists()


def test_a_plain_dcp_directory_without_ckptfn_metadata_is_named_as_such(tmp_path):
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"w": torch.zeros(2)}, checkpoint_id=tmp_path / "plain.dcp")
    with pytest.raises(CheckpointError, match="no ckptfn.json.*torch.distributed.checkpoint.load"):
        ckptfn.load_checkpoint(tmp_path / "plain.dcp")


# --- crash points of the commit ------------------------------------------------------------------


class CrashTrees(FileSystem):
    """Performs the first ``stop_after`` mutating operations, then crashes on every later one."""

    MUTATING = ("mkdir", "create", "write", "fsync", "replace", "link", "unlink", "fsync_dir", "rename", "exchange", "rmdir", "copy")

    def __init__(self, stop_after: int, exchange: bool = True) -> None:
        self.stop_after, self.can_exchange, self.ops = stop_after, exchange, []
        for name in self.MUTATING:
            setattr(self, name, self._guard(name, getattr(super(), name)))

    def _guard(self, name, operation):
        def guarded(*args):
            if len(self.ops) >= self.stop_after:
                raise Crash(f"crashed before {name} (operation {len(self.ops)})")
            self.ops.append(name)
            if name == "exchange" and not self.can_exchange:
                raise OSError(errno.EINVAL, "no atomic exchange on this file system (injected)")
            return operation(*args)

        return guarded


class DeadWriters(FileSystem):
    def pid_alive(self, pid):
        return False  # the crashed writer (this test process) counts as gone


def committed(directory: pathlib.Path, name: str) -> int:
    """The version held by a complete tree (its metadata and its tensors agree)."""
    state_dict, metadata = load_consolidated(directory / name)
    assert torch.equal(state_dict["model"]["w"], torch.full((3, 4), float(metadata["epoch"])))
    return metadata["epoch"]


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "rename-aside-fallback"])
def test_a_crash_at_any_operation_of_the_commit_leaves_every_name_whole(tmp_path, exchange):
    targets = [Target("best_loss.pt"), Target("best_corr.pt", overwrite=False)]
    for stop_after in range(200):
        directory = tmp_path / f"crash{stop_after}"
        temp = write_shards(directory, new_temp_name("best_loss.dcp"), payload(1.0))
        commit_tree(directory, temp, targets, {"format": "ckptfn/1", "epoch": 1, "timestamp": "2026-01-01T00:00:00+00:00"})
        temp = write_shards(directory, new_temp_name("best_loss.dcp"), payload(2.0))
        fs = CrashTrees(stop_after, exchange)
        try:
            commit_tree(directory, temp, targets, {"format": "ckptfn/1", "epoch": 2, "timestamp": "2026-01-02T00:00:00+00:00"}, fs=fs)
            finished = True
        except Crash:
            finished = False
        recover(directory, DeadWriters())  # what the next write (or resume) does first
        assert committed(directory, "best_loss.dcp") in (1, 2)
        corr = committed(directory, "best_corr.dcp")
        archived = [committed(directory, p.name) for p in versions_of(directory, "best_corr.dcp")]
        assert corr == 2 and archived == [1] or corr == 1 and archived in ([], [1])  # version 1 never lost
        assert hidden(directory) == []
        if finished:
            assert committed(directory, "best_loss.dcp") == 2
            break
    else:
        pytest.fail("the commit never finished")
    assert stop_after > 10  # the loop really crashed at many points


def test_recover_removes_dead_writers_trees_and_restores_a_tree_moved_aside(tmp_path):
    def dead(name, kind="tmp"):
        return tmp_path / dcp_temp_name(name, 999_999_999, os.uname().nodename, "ab", kind)  # no such pid

    temp = write_shards(tmp_path, new_temp_name("x.dcp"), payload(1.0))
    commit_tree(tmp_path, temp, [Target("x.pt")], {"format": "ckptfn/1", "epoch": 1})
    os.rename(tmp_path / "x.dcp", dead("x.dcp", "old"))  # killed inside the fallback's window
    killed = write_shards(tmp_path, new_temp_name("y.dcp"), payload(2.0))
    FileSystem().release(killed)  # a killed writer's lock on its tree dies with it
    os.rename(killed, dead("y.dcp"))  # killed while writing
    alive = write_shards(tmp_path, new_temp_name("z.dcp"), payload(3.0))  # this process's: left alone
    recover(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, "x.dcp"])
    assert read_sharded_metadata(tmp_path / "x.dcp")["epoch"] == 1


# --- hostile trees: documented errors, quickly, never another run's files ---------------------------

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from ckptfn.io import dcp as dcp_module  # noqa: E402
from tests.reliability import hostile  # noqa: E402
from tests.reliability.common import in_child  # noqa: E402

#: What each hostile variant's refusal says (read_metadata for the first group, every loader for all).
REFUSALS = {
    "FIFO at ckptfn.json": "ckptfn.json: not a regular file",
    "FIFO at a shard file": "__0_0.distcp: not a regular file",
    "FIFO at .metadata": "not a complete torch.distributed.checkpoint directory",
    "ckptfn.json a symlink to /dev/zero": "ckptfn.json: is a symlink",
    "a shard a symlink to /dev/zero": "__0_0.distcp: is a symlink",
    "a shard a symlink to another run's shard": "__0_0.distcp: is a symlink",
    ".metadata names a shard outside the tree (../)": "is not the name of a file inside the tree",
    ".metadata names a shard by absolute path": "is not the name of a file inside the tree",
    ".metadata reads past a shard's end": "lie outside",
    ".metadata asks for a decompressing extension": "is stored through DCP extensions ['stream.zstd/1']",
    ".metadata declares a 2**40-element tensor": "a tensor of 1099511627776 elements in chunks of 4",
    ".metadata puts a value at list index 10**9": "key 1000000000 (a list index must be below 2)",
    ".metadata names torch._inductor": "torch._inductor is not allowed",
    ".metadata names a DCP planner dataclass": "torch.distributed.checkpoint.planner.SavePlan is not allowed",
    ".metadata points a value at a pickle of bytearray(3 GiB)": "refused: builtins.bytearray(int 3221225472)",
    "ckptfn.json nested 100,000 deep": "ckptfn.json: cannot be read (nested too deeply)",
    "ckptfn.json of 17 MiB": "more than the 16777216 it may hold",
}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return hostile.tree_template(tmp_path_factory.mktemp("trees"))


def _refusal(reader: str, tree: str) -> list:
    import logging
    import time

    logging.getLogger().setLevel(logging.CRITICAL)  # DCP logs each refusal to the root logger
    warnings.simplefilter("ignore")
    started = time.monotonic()
    try:
        if reader == "read_metadata":
            ckptfn.read_metadata(tree)
        elif reader == "load_checkpoint":
            ckptfn.load_checkpoint(tree)
        else:
            ckptfn.load_sharded(tree, {"w": torch.zeros(4), "n": 0})
    except CheckpointError as error:
        return ["CheckpointError", str(error), time.monotonic() - started]
    except BaseException as error:  # noqa: BLE001 - reported
        return [type(error).__name__, str(error), time.monotonic() - started]
    return ["accepted", "", time.monotonic() - started]


@pytest.mark.parametrize("variant", sorted(REFUSALS))
def test_a_hostile_tree_is_refused_by_every_loader_quickly_naming_what_is_wrong(tmp_path, template, variant):
    # before: FIFOs hung resume, inspect and load; /dev/zero gave MemoryError; a symlinked shard or a
    # relative_path outside the tree loaded another run's tensors; list index 10**9 hung the load
    assert set(REFUSALS) == set(hostile.TREE_VARIANTS)
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    tree, other = tmp_path / "run" / "best.dcp", tmp_path / "other" / "best.dcp"
    hostile.TREE_VARIANTS[variant](tree, other)
    readers = ("load_checkpoint", "load_sharded") if variant.startswith(".metadata") else (
        "read_metadata", "load_checkpoint", "load_sharded")
    for reader in readers:
        outcome, value = in_child(_refusal, reader, str(tree), timeout=30)
        assert outcome == "ok", (reader, outcome, value)
        kind, message, seconds = value
        assert kind == "CheckpointError" and str(tree) in message and REFUSALS[variant] in message, (reader, message)
        assert seconds < 5


def test_read_metadata_does_not_see_what_only_dcp_metadata_holds(tmp_path, template):
    # ckptfn.json and the tree's entries are sound: read_metadata (torch-free) accepts; every load refuses
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    tree = tmp_path / "run" / "best.dcp"
    hostile.TREE_VARIANTS[".metadata names a shard by absolute path"](tree, tmp_path / "other" / "best.dcp")
    assert ckptfn.read_metadata(tree)["epoch"] == 0


def test_the_metadata_allow_list_is_exactly_what_dcp_writes(tmp_path):
    """Every global real DCP saves name is allowed; every DCP class allowed is one they name."""
    import torch.distributed.checkpoint as dcp

    seen = set()

    def recording(module, name):
        seen.add((module, name))
        return dcp_module._resolve_metadata_global(module, name)

    payloads = [
        {"w": torch.zeros(3)},
        {"model": {"w": torch.randn(3, 4), "b": torch.arange(4.0)}, "epoch": 3, "note": "x", "lst": [1, 2.5], "b": b"ab"},
        {name: torch.zeros(2, dtype=dtype) for name, dtype in
         [("i", torch.int64), ("bf", torch.bfloat16), ("bool", torch.bool), ("c", torch.complex64),
          ("f8", torch.float8_e4m3fn), ("u16", torch.uint16), ("h", torch.float16)]},
        {"t": torch.randn(4, 4).t(), "cl": torch.randn(1, 3, 4, 4).to(memory_format=torch.channels_last),
         "scalar": torch.tensor(1.0), "empty": torch.zeros(0), "p": torch.nn.Parameter(torch.ones(2))},
        {"opt": torch.optim.Adam(torch.nn.Linear(2, 2).parameters()).state_dict()},
    ]
    for index, state in enumerate(payloads):
        with pytest.warns(UserWarning, match="single process"):
            dcp.save(state, checkpoint_id=tmp_path / f"t{index}")
        with open(tmp_path / f"t{index}" / ".metadata", "rb") as file:
            dcp_module.unpickle.load(file, recording)
    dcp_classes = {pair for pair in seen if pair[0].startswith("torch.distributed")}
    assert dcp_classes == set(dcp_module._DCP_CLASSES)
    assert ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING") in dcp_classes
    assert all(dcp_module._resolve_metadata_global(*pair) is not None for pair in seen)
    for refused in [("torch.distributed.checkpoint.planner", "LoadItemType"), ("torch.distributed.checkpoint.planner", "SavePlan"),
                    ("torch", "_inductor"), ("torch", "load"), ("torch.distributed.checkpoint.metadata", "__builtins__"),
                    ("builtins", "set"), ("os", "system")]:
        assert dcp_module._resolve_metadata_global(*refused) is None, refused


def test_refusing_a_name_imports_nothing():
    # the allow-list looked names up with getattr on torch, which imported torch._inductor (2.8 s)
    code = (
        "import sys, torch\n"
        "from ckptfn.io.dcp import _resolve_metadata_global\n"
        "assert _resolve_metadata_global('torch', '_inductor') is None\n"
        "assert _resolve_metadata_global('torch', 'float32') is torch.float32\n"
        "assert 'torch._inductor' not in sys.modules, 'a refused name was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
