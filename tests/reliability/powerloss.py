"""Power loss: every on-disk state a power cut may leave during a save, under two persistence models.

The method of ALICE (Pillai et al., OSDI'14) and CrashMonkey (Mohan et al., OSDI'18): run a
save for real through a recording seam (``Recorder``, a ``FileSystem``) that names the file
(inode) every operation touches, replay the recording into a model of the disk, and from the
model enumerate the states a power cut after each operation may leave:

- **strict POSIX**: data written to a file is durable only after that file's fsync; a
  directory operation (create, link, rename, unlink, mkdir, rmdir, exchange) only after an
  fsync of that directory; un-synced directory operations survive in any subset.
- **ordered journaling** (ext4 ``data=ordered``): directory operations persist in order (a
  prefix, from the last fsync on); a file's data persists after its fsync, or with a rename
  of that file (ext4's replace-by-rename rule).

Each distinct state is materialized in a scratch directory, recovered the way the next run
recovers (the sweep of dead writers' temporaries), and checked: every final name holds its
complete old or complete new entry (byte for byte); no archived version that the save meant
to keep is lost; a save that returned is durable (only the new entries, after the last
operation); resuming from the files gives, per strategy, the old or the new best.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import itertools
import os
import pathlib
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator

import torch

import ckptfn
from ckptfn.core.naming import archived_of, parse_temp_name, temp_name
from ckptfn.io.dcp import write_shards
from ckptfn.io.fs import LINKS_UNSUPPORTED, FileSystem
from ckptfn.io.publish import sweep
from ckptfn.io.write import commit_tree, write_snapshot
from ckptfn.kit import Target
from tests.reliability.common import Tally

UTC = dt.timezone.utc
MODELS = ("strict POSIX", "ordered journaling")
#: Above this many un-synced directory operations, strict POSIX samples subsets instead of all 2^n.
MAX_EXHAUSTIVE_PENDING = 12


# --- the model ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Node:
    """An inode: a file (``data``), a directory (``entries``) or a symlink (``data`` = target)."""

    kind: str
    data: bytes = b""
    durable: bytes = b""  # a file's data as of its last fsync
    renamed_with: bytes | None = None  # ordered journaling: the data a rename of this file carried
    entries: dict[str, int] = dataclasses.field(default_factory=dict)
    durable_entries: dict[str, int] = dataclasses.field(default_factory=dict)
    pending: list[tuple[int, tuple[tuple[str, int | None], ...]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Disk:
    """The model: inodes by id, the root directory (durable), and the operations so far."""

    nodes: dict[int, Node]
    root: int
    seq: int = 0
    last_sync: int = 0  # ordered journaling: everything before the last fsync is durable
    dir_ops: list[tuple[int, int, tuple[tuple[str, int | None], ...]]] = dataclasses.field(default_factory=list)

    def new(self, node: Node) -> int:
        ident = max(self.nodes) + 1
        self.nodes[ident] = node
        return ident

    def lookup(self, parts: tuple[str, ...]) -> int | None:
        ident = self.root
        for part in parts:
            ident = self.nodes[ident].entries.get(part)
            if ident is None:
                return None
        return ident

    def change(self, directory: int, effects: tuple[tuple[str, int | None], ...]) -> None:
        """One atomic directory operation: apply it now, pending until the directory is fsynced."""
        self.seq += 1
        node = self.nodes[directory]
        for name, ident in effects:
            if ident is None:
                node.entries.pop(name, None)
            else:
                node.entries[name] = ident
        node.pending.append((self.seq, effects))
        self.dir_ops.append((self.seq, directory, effects))


def _load(root: pathlib.Path) -> Disk:
    """The model of what is on disk under ``root`` now, all of it durable."""
    nodes: dict[int, Node] = {}

    def visit(path: pathlib.Path) -> int:
        ident = len(nodes) + 1
        if path.is_symlink():
            nodes[ident] = Node("link", os.readlink(path).encode(), os.readlink(path).encode())
        elif path.is_dir():
            node = nodes[ident] = Node("dir")
            for child in sorted(os.listdir(path)):
                node.entries[child] = visit(path / child)
            node.durable_entries = dict(node.entries)
        else:
            data = path.read_bytes()
            nodes[ident] = Node("file", data, data)
        return ident

    return Disk(nodes, visit(root))


class Recorder(FileSystem):
    """The real file system, with every operation replayed into a ``Disk`` model; ``states``
    holds the model after each operation (``states[0]``: before the first)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.disk = _load(root)
        self.states = [copy.deepcopy(self.disk)]
        self._files: dict[int, int] = {}  # id(raw file) -> inode

    # the model's view of a path
    def _parts(self, path: pathlib.Path) -> tuple[str, ...]:
        return pathlib.Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)).parts

    def _parent(self, path: pathlib.Path) -> tuple[int, str]:
        parts = self._parts(path)
        parent = self.disk.lookup(parts[:-1])
        assert parent is not None, f"no directory for {path} in the model"
        return parent, parts[-1]

    def _ident(self, path: pathlib.Path) -> int:
        ident = self.disk.lookup(self._parts(path))
        assert ident is not None, f"{path} is not in the model"
        return ident

    def _done(self) -> None:
        self.states.append(copy.deepcopy(self.disk))

    # directory operations
    def make_directory(self, path):
        super().make_directory(path)
        parent, name = self._parent(path)
        self.disk.change(parent, ((name, self.disk.new(Node("dir"))),))
        self._done()

    def create(self, path):
        file = super().create(path)
        parent, name = self._parent(path)
        ident = self.disk.new(Node("file"))
        self._files[id(file._raw)] = ident
        self.disk.change(parent, ((name, ident),))
        self._done()
        return file

    def symlink(self, text, target):
        super().symlink(text, target)
        parent, name = self._parent(target)
        self.disk.change(parent, ((name, self.disk.new(Node("link", text.encode(), text.encode()))),))
        self._done()

    def link(self, source, target):
        super().link(source, target)
        parent, name = self._parent(target)
        self.disk.change(parent, ((name, self._ident(source)),))
        self._done()

    def _move(self, source, target) -> None:
        (parent, old), (other, new) = self._parent(source), self._parent(target)
        assert parent == other, "ckptfn renames within one directory"
        moved = self._ident(source)
        node = self.disk.nodes[moved]
        if node.kind == "file":
            node.renamed_with = node.data
        self.disk.change(parent, ((new, moved), (old, None)))
        self._done()

    def replace(self, source, target):
        super().replace(source, target)
        self._move(source, target)

    def rename(self, source, target):
        super().rename(source, target)
        self._move(source, target)

    def rename_exclusive(self, source, target):
        before = len(self.states)
        super().rename_exclusive(source, target)
        if len(self.states) == before:  # one atomic rename (else a link and an unlink, recorded)
            self._move(source, target)

    def exchange(self, a, b):
        super().exchange(a, b)
        (parent, first), (_, second) = self._parent(a), self._parent(b)
        one, two = self._ident(a), self._ident(b)
        self.disk.change(parent, ((first, two), (second, one)))
        self._done()

    def unlink(self, path):
        super().unlink(path)
        parent, name = self._parent(path)
        self.disk.change(parent, ((name, None),))
        self._done()

    def rmdir(self, path):
        super().rmdir(path)
        parent, name = self._parent(path)
        self.disk.change(parent, ((name, None),))
        self._done()

    # data and durability
    def write(self, raw, data):
        done = super().write(raw, data)
        node = self.disk.nodes[self._files[id(raw)]]
        node.data += bytes(memoryview(data).cast("B"))
        self.disk.seq += 1
        self._done()
        return done

    def fsync(self, raw):
        super().fsync(raw)
        node = self.disk.nodes[self._files[id(raw)]]
        node.durable = node.data
        self.disk.seq += 1
        self.disk.last_sync = self.disk.seq
        self._done()

    def fsync_dir(self, path):
        super().fsync_dir(path)
        node = self.disk.nodes[self._ident(path)]
        node.durable_entries = dict(node.entries)
        node.pending = []
        self.disk.seq += 1
        self.disk.last_sync = self.disk.seq
        self._done()

    def adopt_external(self, path: pathlib.Path) -> None:
        """Add a tree another writer made (DCP's shards, fsynced files, un-synced entries)."""
        parent, name = self._parent(path)

        def visit(at: pathlib.Path) -> int:
            if at.is_dir():
                node = Node("dir")
                ident = self.disk.new(node)
                for child in sorted(os.listdir(at)):
                    child_ident = visit(at / child)
                    self.disk.seq += 1
                    node.entries[child] = child_ident
                    node.pending.append((self.disk.seq, ((child, child_ident),)))
                return ident
            data = at.read_bytes()
            return self.disk.new(Node("file", data, data))

        self.disk.change(parent, ((name, visit(path)),))
        self._done()


class NoFileFsync(Recorder):
    """A broken protocol for the self-test: file fsyncs do nothing."""

    def fsync(self, raw):
        self.disk.seq += 1
        self._done()


class NoDirFsyncAfterArchive(Recorder):
    """A broken protocol for the self-test: no directory fsync between an archive name and the replace."""

    def fsync_dir(self, path):
        last = self._last_named
        self._last_named = None
        if last is not None and any(archived_of(last, name) for name in self._finals):
            self.disk.seq += 1
            self._done()
            return
        super().fsync_dir(path)

    _last_named: str | None = None
    _finals: tuple[str, ...] = ()

    def link(self, source, target):
        super().link(source, target)
        self._last_named = pathlib.Path(target).name

    def rename_exclusive(self, source, target):
        super().rename_exclusive(source, target)
        self._last_named = pathlib.Path(target).name


# --- crash states ------------------------------------------------------------------------------


Entry = dict  # a materialized view: name -> bytes (file), ("link", target) or a nested Entry (dir)


def _view(disk: Disk, ident: int, data_of: Callable[[int, Node], bytes], entries_of) -> object:
    node = disk.nodes[ident]
    if node.kind == "file":
        return data_of(ident, node)
    if node.kind == "link":
        return ("link", node.data)
    return {name: _view(disk, child, data_of, entries_of) for name, child in sorted(entries_of(ident, node).items())}


def _apply(entries: dict[str, int], effects) -> None:
    for name, ident in effects:
        if ident is None:
            entries.pop(name, None)
        else:
            entries[name] = ident


def strict_states(disk: Disk, rng: random.Random) -> Iterator[object]:
    """Every state strict POSIX allows after the operations ``disk`` has seen."""
    pending = sorted((seq, ident, effects) for ident, node in disk.nodes.items() if node.kind == "dir"
                     for seq, effects in node.pending)
    if len(pending) <= MAX_EXHAUSTIVE_PENDING:
        subsets = itertools.product((False, True), repeat=len(pending))
    else:
        prefixes = ([i < k for i in range(len(pending))] for k in range(len(pending) + 1))
        sampled = ([rng.random() < 0.5 for _ in pending] for _ in range(2 ** MAX_EXHAUSTIVE_PENDING))
        subsets = itertools.chain(prefixes, sampled)
    for chosen in subsets:
        entries = {ident: dict(node.durable_entries) for ident, node in disk.nodes.items() if node.kind == "dir"}
        for keep, (_, ident, effects) in zip(chosen, pending):
            if keep:
                _apply(entries[ident], effects)
        yield _view(disk, disk.root, lambda _i, node: node.durable, lambda ident, _n: entries[ident])


def ordered_states(history: list[Disk], k: int) -> Iterator[object]:
    """Every state ordered journaling allows after the first ``k`` operations: a prefix of the
    operations since the last fsync, each file's data as of its fsync or its last rename."""
    for j in range(history[k].last_sync_index, k + 1):
        disk = history[j]
        yield _view(
            disk,
            disk.root,
            lambda _i, node: node.renamed_with if node.renamed_with is not None and len(node.renamed_with) > len(node.durable) else node.durable,
            lambda _ident, node: node.entries,
        )


def _index_syncs(history: list[Disk]) -> None:
    """Give each model state the index of the state right after the last fsync before it."""
    last = 0
    for index, disk in enumerate(history):
        if index and disk.last_sync != history[index - 1].last_sync:
            last = index
        disk.last_sync_index = last


def _fingerprint(view: object) -> str:
    return hashlib.sha256(repr(view).encode()).hexdigest()


def materialize(view: dict, at: pathlib.Path) -> None:
    at.mkdir()
    for name, item in view.items():
        if isinstance(item, dict):
            materialize(item, at / name)
        elif isinstance(item, tuple):
            os.symlink(item[1].decode(), at / name)
        else:
            (at / name).write_bytes(item)


def snapshot_view(path: pathlib.Path) -> object:
    if path.is_symlink():
        return ("link", os.readlink(path).encode())
    if path.is_dir():
        return {name: snapshot_view(path / name) for name in sorted(os.listdir(path))}
    return path.read_bytes()


class DeadWriters(FileSystem):
    def pid_alive(self, pid: int) -> bool:
        return False  # after a power cut, every writer of the old boot is gone


# --- scenarios ---------------------------------------------------------------------------------


def _payload(epoch: int) -> dict:
    return {"model": {"w": torch.full((4,), float(epoch))}, "epoch": epoch}


def _metadata(names: list[str], epoch: int) -> dict:
    saves = [{"filename": n, "metric_name": "val_loss", "mode": "min", "value": 1.0 / (epoch + 1), "epoch": epoch}
             for n in names]
    stamp = (dt.datetime(2026, 1, 1, tzinfo=UTC) + dt.timedelta(hours=epoch)).isoformat()
    return {"format": "ckptfn/1", "epoch": epoch, "timestamp": stamp, "saves": saves, "metrics": {},
            "manager_state": None, "versions": {}}


class NoLinks(Recorder):
    def link(self, source, target):
        raise OSError(sorted(LINKS_UNSUPPORTED)[0], "no hard links here (injected)")


@dataclasses.dataclass
class Scenario:
    name: str
    targets: list[Target]
    earlier: int = 1  # saves made (durably) before the recorded one
    sharded: bool = False
    new_directory: bool = False
    no_links: bool = False
    stale_temp: bool = False


SCENARIOS = [
    Scenario("first save into a new directory", [Target("best.pt")], earlier=0, new_directory=True),
    Scenario("overwrite", [Target("best.pt")]),
    Scenario("archive", [Target("best.pt", overwrite=False)], earlier=2),
    Scenario("several names, one write", [Target("best.pt"), Target("corr.pt", overwrite=False), Target("last.pt")]),
    Scenario("no hard links", [Target("best.pt"), Target("corr.pt", overwrite=False)], no_links=True),
    Scenario("keep pruning", [Target("best.pt", overwrite=False, keep=2)], earlier=3),
    Scenario("stale-temporary cleanup", [Target("best.pt")], stale_temp=True),
    Scenario("sharded first save", [Target("best.pt")], earlier=0, sharded=True, new_directory=True),
    Scenario("sharded overwrite", [Target("best.pt"), Target("last.pt")], sharded=True),
    Scenario("sharded archive", [Target("best.pt", overwrite=False)], earlier=2, sharded=True),
    Scenario("sharded keep", [Target("best.pt", overwrite=False, keep=2)], earlier=3, sharded=True),
]


def _save(directory: pathlib.Path, scenario: Scenario, epoch: int, fs: FileSystem) -> None:
    names = [t.filename for t in scenario.targets]
    if not scenario.sharded:
        write_snapshot(directory, scenario.targets, _payload(epoch), _metadata(names, epoch), fs=fs)
        return
    temp = temp_name("best.dcp", os.getpid(), os.uname().nodename, f"{epoch:04x}", namespace=FileSystem().pid_namespace())
    tree = write_shards(directory, temp, _payload(epoch), fs=fs)
    if isinstance(fs, Recorder):
        fs.adopt_external(tree)
    commit_tree(directory, tree, scenario.targets, _metadata(names, epoch), fs=fs)


@dataclasses.dataclass
class Expected:
    old: dict[str, object]  # final name -> entry before the recorded save (None: absent)
    new: dict[str, object]  # final name -> entry after it
    kept: list[object]  # archived entries that must survive any crash
    old_bests: dict[str, float | None]
    new_bests: dict[str, float | None]


def _final_names(scenario: Scenario) -> list[str]:
    return [ckptfn.core.naming.dcp_name(t.filename) if scenario.sharded else t.filename for t in scenario.targets]


def _archived(view: dict, scenario: Scenario) -> list[object]:
    finals = _final_names(scenario)
    return sorted((item for name, item in view.items() if any(archived_of(name, f) for f in finals)), key=repr)


def _bests(directory: pathlib.Path, scenario: Scenario) -> dict[str, float | None]:
    config = ckptfn.Config([ckptfn.Strategy("val_loss", filename=t.filename, overwrite=t.overwrite,
                                            keep=t.keep) for t in scenario.targets])
    state = ckptfn.restore_from_directory(config, directory, unreadable="warn")  # a torn name is counted above
    return {strategy.filename: best.value for strategy, best in zip(config.strategies, state.bests)}


def check_state(view: dict, expected: Expected, scenario: Scenario, scratch: pathlib.Path, returned: bool) -> list[tuple[str, str]]:
    """Materialize one crash state, recover it, and list its problems as (category, message)."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    problems = []
    run_dir = view.get("run")
    if run_dir is None:
        present = {}
    else:
        materialize(run_dir, scratch / "run")
        sweep(scratch / "run", DeadWriters())
        present = snapshot_view(scratch / "run")
    for name in _final_names(scenario):
        got = present.get(name)
        allowed = [expected.new[name]] if returned else [expected.old[name], expected.new[name]]
        if got not in allowed:
            what = "absent" if got is None else "neither the old nor the new entry"
            problems.append(("corruption", f"{name} is {what}" + (" after the save returned" if returned else "")))
    archived = _archived(present, scenario)
    for version in expected.kept:
        if version not in archived and version not in present.values():
            problems.append(("lost", "an archived version the save keeps is gone"))
    if (scratch / "run").is_dir():
        bests = _bests(scratch / "run", scenario)
        for name, value in bests.items():
            if value not in (expected.old_bests.get(name), expected.new_bests.get(name)):
                problems.append(("corruption", f"resume believes {name} = {value}, neither old nor new"))
    return problems


def run_scenario(scenario: Scenario, recorder_type: type[Recorder], tally: Tally, *, rng: random.Random) -> None:
    with tempfile.TemporaryDirectory(prefix="ckptfn-powerloss-") as work:
        work = pathlib.Path(work)
        root, directory = work / "root", work / "root" / "run"
        root.mkdir()
        if not scenario.new_directory:
            directory.mkdir()
        for epoch in range(scenario.earlier):
            _save(directory, scenario, epoch, FileSystem())
        if scenario.stale_temp:
            dead = temp_name("best.pt", 999_999_999, os.uname().nodename, "ab")
            (directory / dead).write_bytes(b"partial")
        before = snapshot_view(directory) if directory.exists() else {}
        old_bests = _bests(directory, scenario) if directory.exists() else {}
        recorder = (NoLinks if scenario.no_links and recorder_type is Recorder else recorder_type)(root)
        if isinstance(recorder, NoDirFsyncAfterArchive):
            recorder._finals = tuple(_final_names(scenario))
        _save(directory, scenario, scenario.earlier, recorder)
        after = snapshot_view(directory)
        finals = _final_names(scenario)
        kept_after = _archived(after, scenario)
        expected = Expected(
            old={n: before.get(n) for n in finals},
            new={n: after.get(n) for n in finals},
            kept=[v for v in _archived(before, scenario) if v in kept_after]
            + [before[n] for n, t in zip(finals, scenario.targets) if not t.overwrite and n in before and before[n] in kept_after],
            old_bests=old_bests,
            new_bests=_bests(directory, scenario),
        )
        history = recorder.states
        _index_syncs(history)
        for model in MODELS:
            seen: set[str] = set()
            for k, disk in enumerate(history):
                states = strict_states(disk, rng) if model == MODELS[0] else ordered_states(history, k)
                returned = k == len(history) - 1
                for view in states:
                    key = _fingerprint(view) + str(returned)
                    if key in seen:
                        continue
                    seen.add(key)
                    tally.tried("fault", f"power loss, {model}")
                    for category, message in check_state(view, expected, scenario, work / "scratch", returned):
                        tally.problem("fault", f"power loss, {model}", category, f"{scenario.name}, after op {k}: {message}")


def run(*, scenarios=SCENARIOS, recorder_type: type[Recorder] = Recorder, seed: int = 0) -> Tally:
    tally, rng = Tally(), random.Random(seed)
    for model in MODELS:
        tally.tried("fault", f"power loss, {model}", 0)
    for scenario in scenarios:
        run_scenario(scenario, recorder_type, tally, rng=rng)
    return tally


class NoParentFsyncAfterMkdir(Recorder):
    """A broken protocol (the old one): a new directory's entry is never made durable."""

    def mkdir(self, path):
        path = pathlib.Path(path)
        if not path.is_dir():
            self.make_directory(path)


class DropBeforeDurable(Recorder):
    """A broken protocol (the old one): the superseded tree is removed before the exchange is durable."""

    _exchanged = False

    def exchange(self, a, b):
        super().exchange(a, b)
        self._exchanged = True

    def fsync_dir(self, path):
        if self._exchanged:  # the fsync the protocol makes right after an exchange, skipped
            self._exchanged = False
            self.disk.seq += 1
            self._done()
            return
        super().fsync_dir(path)


#: The broken protocols the self-test runs, and a scenario each must be caught in.
BROKEN = {
    NoFileFsync: "overwrite",
    NoDirFsyncAfterArchive: "archive",
    NoParentFsyncAfterMkdir: "first save into a new directory",
    DropBeforeDurable: "sharded overwrite",
}
