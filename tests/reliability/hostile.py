"""Hostile files: nothing runs, nothing outside the directory is touched, nothing hangs.

Every case runs in a forked child with a timeout (``in_child``), so code that
would run, a read that would block (a FIFO) or a load that would blow up stays
in the child and is reported. Kinds:

- a pickle that would execute code, in every container torch knows (raw pickle,
  zip, legacy format) and through every reader (load, metadata, resume, the
  archive path of a save);
- zip bombs: a deflated member that expands 1000:1, and member headers that claim
  more bytes than the file holds;
- symlinks planted at a final name (to a file, a FIFO or a directory outside the
  output directory) and at an archive name, with and without hard links: the
  save replaces the link and never writes, reads or hard-links through it;
- strategy filenames with path traversal;
- odd files at a configured name: FIFOs, directories, metadata with out-of-range
  values or timestamps, extreme modification times.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pathlib
import pickle
import shutil
import socket
import stat
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable

import torch

import ckptfn
from ckptfn import CheckpointError, CheckpointManager, CheckpointWriteError, ConfigError, Strategy
from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target
from ckptfn.io.fs import REAL
from ckptfn.core.naming import archive_name, archived_of, temp_name

from tests.faults import NoLinksFS
from tests.reliability.common import Tally, clock, dead_pid, in_child, payload, payload_problem

SECTION = "input"
PICKLE = "hostile: pickle that would run code"
BOMB = "hostile: zip bomb / oversized member header"
SYMLINK = "hostile: symlink at a final or archive name"
TRAVERSAL = "hostile: path-traversal filename"
ODD = "hostile: odd file or metadata at a final name"

LOSS = {"metric_name": "val_loss", "filename": "best.pt"}
KEEP = {"metric_name": "val_loss", "filename": "best.pt", "overwrite": False}


class RunsCommand:
    """Unpickling this runs a shell command (if the loader lets it)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def good_bytes(epoch: int = 0, elements: int = 64, saves: list | None = None) -> bytes:
    """A genuine ckptfn checkpoint (as ``write_snapshot`` writes it), as bytes."""
    with tempfile.TemporaryDirectory() as scratch:
        metadata = {"format": "ckptfn/1", "epoch": epoch, "timestamp": clock(epoch).isoformat(), "saves": saves or []}
        (path,) = write_snapshot(scratch, [Target("x.pt")], payload(epoch, elements), metadata)
        return path.read_bytes()


def replace_member(data: bytes, member: str, content: bytes, compress: int = zipfile.ZIP_STORED) -> bytes:
    """The zip archive ``data`` with one member's content replaced (order and names kept)."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            body = content if info.filename.endswith(member) else source.read(info.filename)
            target.writestr(info.filename, body, compress_type=compress if info.filename.endswith(member) else zipfile.ZIP_STORED)
    return out.getvalue()


def evil_variants(marker: pathlib.Path) -> dict[str, bytes]:
    """Files that run ``touch marker`` if anything unpickles them unsafely."""
    command = f"touch {marker}"
    evil = {"state_dict": RunsCommand(command), "metadata": {"format": "ckptfn/1", "epoch": 0, "saves": []}}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(evil, zipped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(evil, legacy, _use_new_zipfile_serialization=False)
    exec_pickle = b"cbuiltins\nexec\n(V__import__('os').system(" + repr(command).encode() + b")\ntR."
    metadata_pickle = pickle.dumps({"state_dict": {}, "metadata": {"format": "ckptfn/1", "saves": [RunsCommand(command)]}})
    return {
        "raw pickle": pickle.dumps(evil),
        "torch.save zip": zipped.getvalue(),
        "legacy torch format": legacy.getvalue(),
        "ckptfn file, data.pkl calls builtins.exec": replace_member(good_bytes(), "data.pkl", exec_pickle),
        "ckptfn file, code inside the metadata": replace_member(good_bytes(), "data.pkl", metadata_pickle),
    }


# --- the readers a hostile file can meet --------------------------------------------------------


def _read_load(run: pathlib.Path) -> list:
    try:
        ckptfn.load_checkpoint(run / "best.pt")
    except CheckpointError:
        return []
    return [("corruption", "load_checkpoint accepted it")]


def _read_metadata(run: pathlib.Path) -> list:
    try:
        ckptfn.read_metadata(run / "best.pt")
    except CheckpointError:
        return []
    return [("corruption", "read_metadata accepted it")]


def _resume(run: pathlib.Path) -> list:
    """Resuming over it: refused with an error naming the file, unless the file can be judged."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manager = CheckpointManager(run, [LOSS], resume=True)
    except CheckpointError as error:
        return [] if str(run / "best.pt") in str(error) else [("unexpected", f"the refusal does not name the file: {error}")]
    best = manager.best_values["best.pt"]
    if best is not None:
        return [("corruption", f"resumed a best of {best} from it")]
    try:
        ckptfn.read_metadata(run / "best.pt")  # a readable file of another strategy: judged, starts fresh
    except CheckpointError:
        return [("lost", "took a file it cannot judge for absent: the next save would replace it")]
    return []


def _fresh_manager(run: pathlib.Path) -> list:
    CheckpointManager(run, [LOSS], resume=False)  # looks at existing files to warn about them
    return []


def _archive_save(run: pathlib.Path) -> list:
    """A save with overwrite=False over it: succeeds, keeps the file byte-identical under an archive name."""
    original = (run / "best.pt").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(run, [KEEP], resume=False)  # the explicit opt-in to go over it
    manager.update({"val_loss": -1e300}, payload(1), 1)  # better than any best a file may claim
    problems = []
    archives = [name for name in os.listdir(run) if archived_of(name, "best.pt")]
    if [(run / name).read_bytes() for name in archives] != [original]:
        problems.append(("lost", f"the old file is not kept byte-identical under one archive name: {archives}"))
    state_dict, metadata = ckptfn.load_checkpoint(run / "best.pt")
    if payload_problem(state_dict, metadata) or metadata["epoch"] != 1:
        problems.append(("corruption", "the new best.pt does not hold the new snapshot"))
    return problems


READERS: dict[str, Callable[[pathlib.Path], list]] = {
    "load_checkpoint": _read_load,
    "read_metadata": _read_metadata,
    "CheckpointManager(resume=True)": _resume,
    "CheckpointManager(resume=False)": _fresh_manager,
    "save with overwrite=False over it": _archive_save,
}


def _quietly(base: str, function: Callable, *args) -> object:
    """(In the forked child.) Temporary directories under ``base``, no "already holds" warnings."""
    tempfile.tempdir = base
    logging.getLogger("ckptfn").disabled = True
    logging.getLogger().setLevel(logging.CRITICAL)  # DCP logs each refusal it meets to the root logger
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return function(*args)


def _case(tally: Tally, kind: str, name: str, function: Callable, *args, timeout: float = 60.0) -> None:
    """Run one case in a child; its returned ``(category, message)`` pairs become problems."""
    tally.tried(SECTION, kind)
    base = tempfile.mkdtemp(prefix="ckptfn-hostile-case-", dir=_ram())  # removed even if the child hangs
    try:
        outcome, value = in_child(_quietly, base, function, *args, timeout=timeout)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if outcome == "ok":
        for category, message in value:
            tally.problem(SECTION, kind, category, f"{name}: {message}")
    else:
        tally.problem(SECTION, kind, "unexpected", f"{name}: {outcome} {value}")


def pickles(tally: Tally, work: pathlib.Path) -> None:
    marker = work / "pwned"
    for variant, data in evil_variants(marker).items():
        for reader, read in READERS.items():
            run = work / "pickle"
            run.mkdir()
            (run / "best.pt").write_bytes(data)
            _case(tally, PICKLE, f"{variant} via {reader}", read, run)
            if marker.exists():
                tally.problem(SECTION, PICKLE, "unexpected", f"{variant} via {reader}: the code RAN")
                marker.unlink()
            shutil.rmtree(run)


# --- zip bombs --------------------------------------------------------------------------------


def deflated_bomb(mib: int) -> bytes:
    """A ckptfn-looking checkpoint whose tensor member, deflated, expands ~1000:1 to ``mib`` MiB."""
    with tempfile.TemporaryDirectory() as scratch:
        metadata = {"format": "ckptfn/1", "epoch": 0, "timestamp": clock(0).isoformat(), "saves": []}
        (path,) = write_snapshot(scratch, [Target("x.pt")], {"w": torch.zeros(mib << 18)}, metadata)
        source = zipfile.ZipFile(path)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as target:
            for info in source.infolist():
                method = zipfile.ZIP_DEFLATED if info.filename.endswith("data/0") else zipfile.ZIP_STORED
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = method
                with source.open(info) as member, target.open(entry, "w", force_zip64=True) as sink:
                    shutil.copyfileobj(member, sink, 1 << 20)
        return out.getvalue()


def claim_size(data: bytes, member: str, size: int) -> bytes:
    """``data`` with ``member``'s sizes in its local and central headers set to ``size`` (< 4 GiB)."""
    patched = bytearray(data)
    # (signature, offset of the two sizes, of the name's length, of the name) in local and central headers
    for signature, sizes_at, length_at, name_at in ((b"PK\x03\x04", 18, 26, 30), (b"PK\x01\x02", 20, 28, 46)):
        at = patched.find(signature)
        while at != -1:
            name_length = struct.unpack_from("<H", patched, at + length_at)[0]
            name = bytes(patched[at + name_at : at + name_at + name_length])
            if name.endswith(member.encode()):
                struct.pack_into("<II", patched, at + sizes_at, size, size)
            at = patched.find(signature, at + 4)
    return bytes(patched)


def _bomb_case(data: bytes, reader: str, budget_mib: int, must_refuse: bool) -> list:
    """Read a bomb: refused (or, where the damage is in tensor data a reader never reads,
    at least no other error), within ``budget_mib`` MiB of memory."""
    import resource

    work = pathlib.Path(tempfile.mkdtemp())
    (work / "best.pt").write_bytes(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    problems = [p for p in READERS[reader](work) if must_refuse or "accepted" not in p[1]]
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    if grown > budget_mib:
        problems.append(("unexpected", f"reading a {len(data)}-byte file took {grown} MiB of memory"))
    shutil.rmtree(work)
    return problems


def bombs(tally: Tally, work: pathlib.Path, mib: int = 64) -> None:
    bomb = deflated_bomb(mib)
    good = good_bytes(elements=1024)
    variants = {
        f"deflated tensor member, {len(bomb) >> 10} KiB -> {mib} MiB": bomb,
        "data.pkl claims 2 GiB": claim_size(good, "data.pkl", 2**31),
        "tensor member claims 4 GiB - 1": claim_size(good, "data/0", 2**32 - 1),
        "tensor member claims 1 byte": claim_size(good, "data/0", 1),
        "deflated data.pkl": replace_member(good, "data.pkl", _member(good, "data.pkl"), zipfile.ZIP_DEFLATED),
    }
    for variant, data in variants.items():
        for reader in ("load_checkpoint", "read_metadata", "CheckpointManager(resume=True)"):
            must_refuse = not (variant.endswith("claims 1 byte") and reader != "load_checkpoint")
            _case(tally, BOMB, f"{variant} via {reader}", _bomb_case, data, reader, mib // 2, must_refuse)


def _member(data: bytes, suffix: str) -> bytes:
    archive = zipfile.ZipFile(io.BytesIO(data))
    (name,) = [n for n in archive.namelist() if n.endswith(suffix)]
    return archive.read(name)


# --- symlinks -----------------------------------------------------------------------------------


def _outside_state(path: pathlib.Path) -> tuple:
    info = os.lstat(path)
    content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
    return (info.st_ino, info.st_nlink, info.st_mtime_ns, content)


def _no_entry_shares(run: pathlib.Path, outside: pathlib.Path) -> list:
    inode = os.lstat(outside).st_ino
    shared = [n for n in os.listdir(run) if os.lstat(run / n).st_ino == inode]
    return [("unexpected", f"{shared} hard-link the outside file")] if shared else []


def _symlink_save(kind: str, overwrite: bool, links: bool) -> list:
    """A symlink at the final name pointing outside; the save must replace the link itself."""
    work = pathlib.Path(tempfile.mkdtemp())
    run, outside = work / "run", work / "outside"
    run.mkdir()
    if kind == "file":
        outside.write_bytes(good_bytes(epoch=7))  # a valid checkpoint, so reading through the link would "work"
    elif kind == "fifo":
        os.mkfifo(outside)  # opening it for reading would block forever
    else:
        outside.mkdir()
        (outside / "keep.txt").write_text("outside data")
    os.utime(outside, ns=(10**18, 10**18))
    before = _outside_state(outside)
    (run / "best.pt").symlink_to(outside)
    metadata = {"format": "ckptfn/1", "epoch": 1, "timestamp": clock(1).isoformat(), "saves": []}
    problems = []
    try:
        write_snapshot(run, [Target("best.pt", overwrite)], payload(1), metadata, fs=REAL if links else NoLinksFS())
    except CheckpointWriteError as error:
        problems.append(("unexpected", f"the save failed: {error}"))
    if _outside_state(outside) != before or (kind == "dir" and os.listdir(outside) != ["keep.txt"]):
        problems.append(("unexpected", "the file outside the directory changed"))
    if (run / "best.pt").is_symlink() or not (run / "best.pt").is_file():
        problems.append(("corruption", "best.pt is not a regular file now"))
    elif ckptfn.read_metadata(run / "best.pt")["epoch"] != 1:
        problems.append(("corruption", "best.pt does not hold the new snapshot"))
    problems += _no_entry_shares(run, outside)
    for name in os.listdir(run):
        if name != "best.pt" and not (run / name).is_symlink():
            if kind == "file" and (run / name).read_bytes() == outside.read_bytes():
                problems.append(("unexpected", f"{name} is a copy of the outside file (the link was followed)"))
    if not overwrite:
        kept = [n for n in os.listdir(run) if archived_of(n, "best.pt")]
        if len(kept) != 1 or not (run / kept[0]).is_symlink() or os.readlink(run / kept[0]) != str(outside):
            problems.append(("lost", f"the planted link is not kept as a link under an archive name: {kept}"))
    shutil.rmtree(work)
    return problems


def _symlink_read(kind: str, reader: str) -> list:
    """Readers meeting a link to a FIFO must refuse quickly, not block."""
    work = pathlib.Path(tempfile.mkdtemp())
    run = work / "run"
    run.mkdir()
    os.mkfifo(work / "fifo")
    target = work / "fifo" if kind == "symlink to a FIFO" else None
    if target is None:
        os.mkfifo(run / "best.pt")
    else:
        (run / "best.pt").symlink_to(target)
    problems = READERS[reader](run) if reader != "save with overwrite=False over it" else []
    shutil.rmtree(work)
    return problems


def _symlink_at_archive_name() -> list:
    """A link planted at the archive name the next save will pick, pointing at the current file."""
    work = pathlib.Path(tempfile.mkdtemp())
    run = work / "run"
    old = {"format": "ckptfn/1", "epoch": 0, "timestamp": clock(0).isoformat(), "saves": []}
    try:
        write_snapshot(run, [Target("best.pt", False)], payload(0), old)
        (run / archive_name("best.pt", clock(0))).symlink_to("best.pt")
        new = {**old, "epoch": 1, "timestamp": clock(1).isoformat()}
        write_snapshot(run, [Target("best.pt", False)], payload(1), new)
        epochs = {ckptfn.read_metadata(run / name)["epoch"] for name in os.listdir(run) if not (run / name).is_symlink()}
    finally:
        shutil.rmtree(work)
    return [] if epochs == {0, 1} else [("lost", f"regular files hold epochs {sorted(epochs)}, not 0 and 1")]


def symlinks(tally: Tally, work: pathlib.Path) -> None:
    for kind in ("file", "fifo", "dir"):
        for overwrite in (True, False):
            for links in (True, False):
                name = f"link to an outside {kind}, overwrite={overwrite}, {'hard links' if links else 'no hard links'}"
                _case(tally, SYMLINK, name, _symlink_save, kind, overwrite, links, timeout=30)
    _case(tally, SYMLINK, "link at the next archive name", _symlink_at_archive_name)
    for reader in ("load_checkpoint", "read_metadata", "CheckpointManager(resume=True)", "CheckpointManager(resume=False)"):
        for kind in ("FIFO", "symlink to a FIFO"):
            _case(tally, SYMLINK if kind != "FIFO" else ODD, f"{kind} at best.pt via {reader}", _symlink_read, kind, reader, timeout=20)


# --- path traversal -------------------------------------------------------------------------------

TRAVERSALS = (
    "../escape.pt", "../../escape.pt", "/tmp/escape.pt", "sub/escape.pt", "a/../escape.pt", "..", ".", "...",
    ".hidden.pt", "..\\escape.pt", "\\\\server\\share\\escape.pt", "C:escape.pt", "c:\\escape.pt",
    "escape\0.pt", "", "./escape.pt", "escape.pt/", "/",
)


def _traversal(filename: str) -> list:
    work = pathlib.Path(tempfile.mkdtemp())
    run = work / "run"
    problems = []
    attempts = {
        "Strategy": lambda: Strategy("val_loss", filename=filename),
        "Config.from_mapping": lambda: ckptfn.Config.from_mapping([{"metric_name": "val_loss", "filename": filename}]),
        "CheckpointManager": lambda: CheckpointManager(run, {"metric_name": "val_loss", "filename": filename}),
        "Target": lambda: Target(filename),
    }
    for what, attempt in attempts.items():
        try:
            attempt()
        except ConfigError:
            continue
        problems.append(("unexpected", f"{what} accepted {filename!r}"))
    outside = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    if outside:
        problems.append(("unexpected", f"created {outside}"))
    shutil.rmtree(work)
    return problems


def traversals(tally: Tally) -> None:
    for filename in TRAVERSALS:
        _case(tally, TRAVERSAL, repr(filename), _traversal, filename)


# --- odd metadata and files ---------------------------------------------------------------------

ODD_METADATA = {
    "timestamp before year 1 in UTC": {"timestamp": "0001-01-01T00:00:00+01:00"},
    "timestamp after year 9999 in UTC": {"timestamp": "9999-12-31T23:59:59-01:00"},
    "timestamp not a time": {"timestamp": "yesterday"},
    "timestamp a number": {"timestamp": 12345},
    "naive timestamp": {"timestamp": "2026-01-01T00:00:00"},
    "value beyond float": {"saves": [{"filename": "best.pt", "metric_name": "val_loss", "mode": "min", "value": 10**400, "epoch": 0}]},
    "value NaN": {"saves": [{"filename": "best.pt", "metric_name": "val_loss", "mode": "min", "value": float("nan"), "epoch": 0}]},
    "value a string": {"saves": [{"filename": "best.pt", "metric_name": "val_loss", "mode": "min", "value": "0.1", "epoch": 0}]},
    "epoch negative": {"epoch": -3, "saves": [{"filename": "best.pt", "metric_name": "val_loss", "mode": "min", "value": 0.1, "epoch": -3}]},
    "epoch huge": {"epoch": 10**40, "saves": [{"filename": "best.pt", "metric_name": "val_loss", "mode": "min", "value": 0.1, "epoch": 10**40}]},
    "saves not a list": {"saves": {"best.pt": 1}},
    "manager_state garbage": {"manager_state": {"format": "ckptfn.state/1", "steps": 10**100, "strategies": "x"}},
}


def _odd_metadata(extra: dict) -> list:
    work = pathlib.Path(tempfile.mkdtemp())
    run = work / "run"
    run.mkdir()
    metadata = {"format": "ckptfn/1", "epoch": 0, "timestamp": clock(0).isoformat(), "saves": [], **extra}
    torch.save({"state_dict": payload(0), "metadata": metadata}, run / "best.pt")
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = CheckpointManager(run, [LOSS], resume=True).best_values["best.pt"]
        CheckpointManager(run, [LOSS], resume=False)
    if best is not None and not (isinstance(best, float) and best == best):
        problems.append(("corruption", f"resumed an unusable best {best!r}"))
    problems += _archive_save(run)
    shutil.rmtree(work)
    return problems


def _extreme_mtime(mtime_ns: int) -> list:
    """A foreign file with an extreme modification time at an overwrite=False name (archived by mtime)."""
    work = pathlib.Path(tempfile.mkdtemp())  # under /dev/shm where there is one: tmpfs keeps any mtime
    run = work / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"someone's notes")
    os.utime(run / "best.pt", ns=(mtime_ns, mtime_ns))
    try:
        return _archive_save(run)
    finally:
        shutil.rmtree(work)


def _directory_at_final_name() -> list:
    work = pathlib.Path(tempfile.mkdtemp())
    run = work / "run"
    (run / "best.pt").mkdir(parents=True)
    (run / "best.pt" / "inside.txt").write_text("data")
    problems = []
    try:
        CheckpointManager(run, [LOSS], resume=True)
        problems.append(("unexpected", "resuming over a directory at a checkpoint name was not refused"))
    except CheckpointError as error:
        if str(run / "best.pt") not in str(error):
            problems.append(("unexpected", f"the refusal does not name the path: {error}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(run, [LOSS], resume=False)
    try:
        manager.update({"val_loss": 0.5}, payload(1), 1)
        problems.append(("unexpected", "a save over a directory succeeded"))
    except CheckpointWriteError as error:
        if str(run / "best.pt") not in str(error):
            problems.append(("unexpected", f"the error does not name the path: {error}"))
    if (run / "best.pt" / "inside.txt").read_text() != "data" or [n for n in os.listdir(run) if n.startswith(".")]:
        problems.append(("lost", "the directory was touched or a temporary file was left"))
    shutil.rmtree(work)
    return problems


def _stale_temp_that_cannot_be_removed() -> list:
    """A directory under a dead writer's temporary name: housekeeping must not block saves."""
    work = pathlib.Path(tempfile.mkdtemp())
    run = work / "run"
    (run / temp_name("best.pt", dead_pid(), socket.gethostname(), "ab12")).mkdir(parents=True)
    try:
        write_snapshot(run, [Target("best.pt")], payload(1), {"format": "ckptfn/1", "epoch": 1, "saves": []})
    except CheckpointWriteError as error:
        return [("unexpected", f"the save failed: {error}")]
    finally:
        shutil.rmtree(work)
    return []


def _ram() -> str | None:
    shm = pathlib.Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def odd_files(tally: Tally) -> None:
    for name, extra in ODD_METADATA.items():
        _case(tally, ODD, f"metadata: {name}", _odd_metadata, extra)
    for name, mtime in (("mtime in year 36812", 2**40 * 10**9), ("mtime before year 1", -(2**40) * 10**9), ("mtime 0", 0)):
        _case(tally, ODD, f"foreign file, {name}", _extreme_mtime, mtime)
    _case(tally, ODD, "directory at the final name", _directory_at_final_name)
    _case(tally, ODD, "directory under a dead writer's temporary name", _stale_temp_that_cannot_be_removed)


# --- unbounded metadata, pickles that ask for memory, damaged zip structure, odd DCP trees -------

ENDLESS = "hostile: metadata that never ends (shared, cyclic, deep)"
ALLOCATION = "hostile: pickle that asks for memory on its say-so"
ZIP = "hostile: damaged zip structure"
TREE = "hostile: odd file in a sharded (DCP) tree"

#: What one read of a hostile file may take, at most (seconds, MiB of memory grown).
READ_SECONDS, READ_MIB = 5.0, 64
_SENTINEL = "\0ckptfn-hostile-splice\0"


def splice(obj: object, raw: bytes) -> bytes:
    """``pickle.dumps(obj, protocol=2)`` with the one string ``_SENTINEL`` in ``obj`` replaced by the raw
    opcodes ``raw`` (which push exactly one object and use no memo slot)."""
    data = pickle.dumps(obj, protocol=2)
    encoded = _SENTINEL.encode()
    token = b"X" + struct.pack("<I", len(encoded)) + encoded
    assert data.count(token) == 1
    start = data.index(token)
    end = start + len(token)
    end += {b"q": 2, b"r": 5}.get(data[end : end + 1], 0)  # the memo slot pickle gave the sentinel: never used again
    return data[:start] + raw + data[end:]


def deep_lists(depth: int) -> bytes:
    """Raw opcodes for lists nested ``depth`` deep (pickle itself would recurse to write them)."""
    return b"]" * depth + b"a" * (depth - 1)


def deep_dicts(depth: int) -> bytes:
    """Raw opcodes for ``{"k": {"k": ...}}``, ``depth`` deep."""
    return b"}" + b"X\x01\x00\x00\x00k}" * (depth - 1) + b"s" * (depth - 1)


def long1(number: int) -> bytes:
    encoded = pickle.encode_long(number)
    return b"\x8a" + bytes([len(encoded)]) + encoded


def bytearray_call(size: int) -> bytes:
    """Raw opcodes for ``bytearray(size)``: torch's weights_only loader allows it, and allocates ``size`` bytes."""
    return b"c__builtin__\nbytearray\n" + long1(size) + b"\x85R"


def declared(opcode: bytes, size: int) -> bytes:
    """An opcode declaring ``size`` bytes of data that are not there (BINBYTES8, BYTEARRAY8, BINUNICODE8)."""
    return opcode + struct.pack("<Q", size) + b"abc"


def _meta(**extra) -> dict:
    return {"format": "ckptfn/1", "epoch": 0, "timestamp": clock(0).isoformat(), "saves": [], **extra}


def in_metadata(raw: bytes) -> bytes:
    """A ckptfn data.pkl whose metadata key ``x`` holds the raw opcodes ``raw``."""
    return splice({"state_dict": {}, "metadata": _meta(x=_SENTINEL)}, raw)


def in_payload(raw: bytes) -> bytes:
    """A ckptfn data.pkl whose payload key ``w`` holds the raw opcodes ``raw``."""
    return splice({"state_dict": {"w": _SENTINEL}, "metadata": _meta()}, raw)


def with_pickle(data_pkl: bytes) -> bytes:
    """A genuine checkpoint file (every zip record intact) whose data.pkl is ``data_pkl``."""
    return replace_member(good_bytes(), "data.pkl", data_pkl)


def torch_saved(**extra) -> bytes:
    """What plain ``torch.save`` writes for a ckptfn-looking record (pickle keeps shared and cyclic data as such)."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(4)}, "metadata": _meta(**extra)}, buffer)
    return buffer.getvalue()


def shared_lists(levels: int = 80) -> list:
    """``L = [L', L']``, ``levels`` deep: 2**levels values as a tree, ``levels`` + 1 lists in memory."""
    shared: list = [0]
    for _ in range(levels):
        shared = [shared, shared]
    return shared


def endless_variants() -> dict[str, bytes]:
    """Checkpoint files whose metadata a naive walk never finishes (or overflows the stack on)."""
    cyclic_list: list = []
    cyclic_list.append(cyclic_list)
    cyclic_dict: dict = {}
    cyclic_dict["self"] = cyclic_dict
    return {
        "80 levels of shared lists (plain torch.save, 2 KB)": torch_saved(x=shared_lists(80)),
        "a list that holds itself": torch_saved(x=cyclic_list),
        "a dict that holds itself": torch_saved(x=cyclic_dict),
        "lists nested 100,000 deep": with_pickle(in_metadata(deep_lists(100_000))),
        "dicts nested 100,000 deep": with_pickle(in_metadata(deep_dicts(100_000))),
        "lists nested 101 deep": with_pickle(in_metadata(deep_lists(101))),
        "a list of 2,000,000 values": with_pickle(in_metadata(b"](" + b"N" * 2_000_000 + b"e")),
    }


def _storage_claims(data_pkl: bytes, numel: int) -> bytes:
    """``data_pkl`` (of ``good_bytes(elements=16)``) with its first storage claiming ``numel`` elements."""
    at = data_pkl.index(b"X\x03\x00\x00\x00cpu")
    at = data_pkl.index(b"K\x10", at)  # BININT1 16: the storage's element count
    return data_pkl[:at] + long1(numel) + data_pkl[at + 2 :]


def _tensor_pickle(rebuild: Callable, args: tuple, storage: tuple) -> bytes:
    """A ckptfn data.pkl holding one tensor rebuilt by ``rebuild(*args)`` (``STORAGE`` in args: the
    storage ``("storage", *storage)``)."""

    class Rebuilt:
        def __reduce__(self):
            return rebuild, args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", *storage) if obj is STORAGE else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"state_dict": {"t": Rebuilt()}, "metadata": _meta()})
    return buffer.getvalue()


STORAGE = object()


def allocation_variants() -> dict[str, bytes]:
    """Small files whose pickle asks a loader to allocate gigabytes, or to reach past a record."""
    good = good_bytes(elements=16)
    hooks = collections.OrderedDict()
    qtensor = _tensor_pickle(
        torch._utils._rebuild_qtensor,
        (STORAGE, 0, (2**31,), (1,), (torch.per_tensor_affine, 0.1, 0), False, hooks),
        (torch.QUInt8Storage, "0", "cpu", 64),
    )
    past = _tensor_pickle(torch._utils._rebuild_tensor_v2, (STORAGE, 10, (16,), (1,), False, hooks),
                          (torch.FloatStorage, "0", "cpu", 16))
    legacy = (b"ctorch._tensor\n_rebuild_from_type_v2\n(ctorch\nFloatTensor\nctorch\nTensor\n"
              + long1(2**31) + b"\x85}tR")
    return {
        "bytearray(3 GiB) in the metadata (a 1 KB file)": with_pickle(in_metadata(bytearray_call(3 << 30))),
        "bytearray(3 GiB) in the payload": with_pickle(in_payload(bytearray_call(3 << 30))),
        "torch.FloatTensor(2**31) via _rebuild_from_type_v2": with_pickle(in_payload(legacy)),
        "BINBYTES8 declaring 3 GiB": with_pickle(in_metadata(declared(b"\x8e", 3 << 30))),
        "BYTEARRAY8 declaring 2**62 bytes": with_pickle(in_metadata(declared(b"\x96", 1 << 62))),
        "BINUNICODE8 declaring 3 GiB": with_pickle(in_metadata(declared(b"\x8d", 3 << 30))),
        "a storage claiming 2**31 elements of a 64-byte record":
            replace_member(good, "data.pkl", _storage_claims(_member(good, "data.pkl"), 2**31)),
        "a quantized tensor of 2**31 elements on a 64-byte storage": replace_member(good, "data.pkl", qtensor),
        "a tensor reaching past its storage": replace_member(good, "data.pkl", past),
    }


def _bounded(data: bytes, reader: str, must_refuse: bool = True) -> list:
    """One reader over ``data`` at best.pt: refused (when ``must_refuse``), within READ_SECONDS and READ_MIB."""
    import resource
    import time

    work = pathlib.Path(tempfile.mkdtemp())
    (work / "best.pt").write_bytes(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    problems = [p for p in READERS[reader](work) if must_refuse or "accepted" not in p[1]]
    took = time.monotonic() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    if took > READ_SECONDS:
        problems.append(("unexpected", f"took {took:.1f} s"))
    if grown > READ_MIB:
        problems.append(("unexpected", f"a {len(data)}-byte file took {grown} MiB of memory"))
    shutil.rmtree(work)
    return problems


def endless(tally: Tally) -> None:
    for variant, data in endless_variants().items():
        for reader in READERS:
            _case(tally, ENDLESS, f"{variant} via {reader}", _bounded, data, reader, timeout=30)


def allocations(tally: Tally) -> None:
    for variant, data in allocation_variants().items():
        for reader in ("load_checkpoint", "read_metadata", "CheckpointManager(resume=True)"):
            _case(tally, ALLOCATION, f"{variant} via {reader}", _bounded, data, reader, timeout=30)


# zip structure ---------------------------------------------------------------------------------


def _central_entry(data: bytes, suffix: str) -> int:
    """Offset of the central directory entry of the member whose name ends with ``suffix``."""
    at = data.find(b"PK\x01\x02")
    while at != -1:
        length = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + length].endswith(suffix.encode()):
            return at
        at = data.find(b"PK\x01\x02", at + 4)
    raise KeyError(suffix)


def _end_record(data: bytes) -> int:
    return data.rindex(b"PK\x05\x06")


#: A saves entry for best.pt: resuming from a file that has it adopts its value.
BEST_ENTRY = {"filename": "best.pt", "metric_name": "val_loss", "mode": "min", "value": 0.25, "epoch": 0}


def zip_variants(good: bytes) -> dict[str, bytes]:
    """A genuine checkpoint damaged in its zip structure, one way each (headers and sizes, never data)."""
    infos = {info.filename.split("/", 1)[1]: info for info in zipfile.ZipFile(io.BytesIO(good)).infolist()}
    tensor, following = infos["data/0"], infos["data/1"]

    def patched(*edits: tuple[int, bytes]) -> bytes:
        out = bytearray(good)
        for at, value in edits:
            out[at : at + len(value)] = value
        return bytes(out)

    def flipped(*offsets: int) -> bytes:
        out = bytearray(good)
        for at in offsets:
            out[at] ^= 0xFF
        return bytes(out)

    local, name_at = tensor.header_offset, tensor.header_offset + 30
    end = _end_record(good)
    return {
        "two damaged bytes in a tensor record's local header (signature)": flipped(local + 1, local + 2),
        "two damaged bytes in a tensor record's local name": flipped(name_at + 8, name_at + 9),
        "a wrong name in a local header": patched((name_at + len(tensor.filename) - 1, b"9")),
        "local header sizes disagree with the central directory": patched((local + 18, struct.pack("<II", 99, 99))),
        "local header says deflated": patched((local + 8, struct.pack("<H", 8))),
        "local extra field runs into the next member": patched((local + 28, struct.pack("<H", 0xFFFF))),
        "truncated inside a tensor record": good[: local + 40],
        "truncated inside the central directory": good[: _central_entry(good, "data/1") + 10],
        "garbage appended": good + b"\0" * 100,
        "garbage prepended": b"\0" * 100 + good,
        "overlapping members": patched((_central_entry(good, "data/1") + 42, struct.pack("<I", tensor.header_offset))),
        "duplicate names": patched((_central_entry(good, "data/1") + 46 + len(following.filename) - 1, b"0"),
                                   (following.header_offset + 30 + len(following.filename) - 1, b"0")),
        "missing data.pkl": patched((_central_entry(good, "data.pkl") + 46 + 8, b"data.pkx"),
                                    (infos["data.pkl"].header_offset + 30 + 8, b"data.pkx")),
        "missing version record": patched((_central_entry(good, "/version") + 46 + 8, b"versioX"),
                                          (infos["version"].header_offset + 30 + 8, b"versioX")),
        "version record out of torch's range": replace_member(good, "version", b"99\n"),
        "byteorder record garbled": replace_member(good, "byteorder", b"middle"),
        "a member's central header points past the end": patched((_central_entry(good, "data/1") + 42, struct.pack("<I", len(good) + 10))),
        "the end record's directory offset points past the end": patched((end + 16, struct.pack("<I", len(good) + 100))),
        "a member marked as a directory": patched((_central_entry(good, "byteorder") + 38, struct.pack("<I", 0x10))),
        "a zip comment (harmless: torch loads it)": patched((end + 20, struct.pack("<H", 5))) + b"hello",
    }


def _agree(data: bytes) -> list:
    """read_metadata accepts the file only if load_checkpoint loads it; resume never adopts a best it cannot load."""
    work = pathlib.Path(tempfile.mkdtemp())
    (work / "best.pt").write_bytes(data)
    outcomes = {}
    for name, read in (("read_metadata", ckptfn.read_metadata), ("load_checkpoint", ckptfn.load_checkpoint)):
        try:
            read(work / "best.pt")
            outcomes[name] = True
        except CheckpointError as error:
            outcomes[name] = False
            if str(work / "best.pt") not in str(error):
                outcomes[name] = f"the error does not name the file: {error}"
    problems = [("unexpected", f"{name}: {outcome}") for name, outcome in outcomes.items() if isinstance(outcome, str)]
    if outcomes["read_metadata"] is True and outcomes["load_checkpoint"] is not True:
        problems.append(("corruption", "read_metadata accepts a file load_checkpoint refuses"))
    problems += [p for p in _resume(work) if outcomes["load_checkpoint"] is not True or "corruption" != p[0]]
    shutil.rmtree(work)
    return problems


def zips(tally: Tally) -> None:
    for variant, data in zip_variants(good_bytes(elements=64, saves=[BEST_ENTRY])).items():
        _case(tally, ZIP, variant, _agree, data, timeout=30)


# DCP trees ---------------------------------------------------------------------------------------


def sharded_run(run: pathlib.Path, value: float = 1.0) -> pathlib.Path:
    """A run directory holding one sharded checkpoint, ``best.dcp``; returns the tree."""
    manager = CheckpointManager(run, [{"metric_name": "val_loss", "filename": "best.pt"}], sharded=True)
    manager.update({"val_loss": 0.5}, {"w": torch.full((4,), value), "n": int(value)}, 0)
    return run / "best.dcp"


def _rewrite_dcp_metadata(tree: pathlib.Path, change: Callable) -> None:
    """Rewrite DCP's .metadata with ``change(metadata)`` applied (through the library's safe reader)."""
    from ckptfn.io.dcp import _dcp

    metadata = _dcp().reader(tree).read_metadata()
    change(metadata)
    (tree / ".metadata").write_bytes(pickle.dumps(metadata))


def _storage_infos(metadata, **changes) -> None:
    import dataclasses

    metadata.storage_data = {key: dataclasses.replace(info, **changes) for key, info in metadata.storage_data.items()}


def _plant(tree: pathlib.Path, name: str, kind: str, other: pathlib.Path | None = None) -> None:
    target = tree / name
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev/zero":
        target.symlink_to("/dev/zero")
    else:
        target.symlink_to(other / name)


def _hostile_value(tree: pathlib.Path) -> None:
    """The value ``n`` of the tree rewritten as a torch.save archive whose pickle is ``bytearray(3 GiB)``."""
    import dataclasses

    shard = tree / "__0_0.distcp"
    data = shard.read_bytes()

    def change(metadata) -> None:
        key = next(key for key in metadata.storage_data if key.fqn == "n")
        info = metadata.storage_data[key]
        blob = data[info.offset : info.offset + info.length]
        evil = replace_member(blob, "data.pkl", b"\x80\x02" + bytearray_call(3 << 30) + b".")
        shard.write_bytes(data + evil)
        metadata.storage_data[key] = dataclasses.replace(info, offset=len(data), length=len(evil))

    _rewrite_dcp_metadata(tree, change)


def _deep_json(tree: pathlib.Path) -> None:
    (tree / "ckptfn.json").write_text('{"format": "ckptfn/1", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _big_json(tree: pathlib.Path) -> None:
    (tree / "ckptfn.json").write_text('{"format": "ckptfn/1", "x": "' + "x" * (17 << 20) + '"}')


def _global_in_metadata(module: str, name: str) -> Callable:
    def plant(tree: pathlib.Path) -> None:
        (tree / ".metadata").write_bytes(b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n)R.")

    return plant


TREE_VARIANTS: dict[str, Callable] = {
    "FIFO at ckptfn.json": lambda tree, other: _plant(tree, "ckptfn.json", "fifo"),
    "FIFO at a shard file": lambda tree, other: _plant(tree, "__0_0.distcp", "fifo"),
    "FIFO at .metadata": lambda tree, other: _plant(tree, ".metadata", "fifo"),
    "ckptfn.json a symlink to /dev/zero": lambda tree, other: _plant(tree, "ckptfn.json", "dev/zero"),
    "a shard a symlink to /dev/zero": lambda tree, other: _plant(tree, "__0_0.distcp", "dev/zero"),
    "a shard a symlink to another run's shard": lambda tree, other: _plant(tree, "__0_0.distcp", "link", other),
    ".metadata names a shard outside the tree (../)": lambda tree, other: _rewrite_dcp_metadata(
        tree, lambda m: _storage_infos(m, relative_path=f"../../{other.parent.name}/{other.name}/__0_0.distcp")),
    ".metadata names a shard by absolute path": lambda tree, other: _rewrite_dcp_metadata(
        tree, lambda m: _storage_infos(m, relative_path=str(other / "__0_0.distcp"))),
    ".metadata reads past a shard's end": lambda tree, other: _rewrite_dcp_metadata(
        tree, lambda m: _storage_infos(m, length=1 << 40)),
    ".metadata asks for a decompressing extension": lambda tree, other: _rewrite_dcp_metadata(
        tree, lambda m: _storage_infos(m, transform_descriptors=["stream.zstd/1"])),
    ".metadata declares a 2**40-element tensor": lambda tree, other: _rewrite_dcp_metadata(
        tree, lambda m: setattr(m.state_dict_metadata["w"], "size", torch.Size([2**40]))),
    ".metadata puts a value at list index 10**9": lambda tree, other: _rewrite_dcp_metadata(
        tree, lambda m: m.planner_data.update(n=("n", 10**9))),
    ".metadata names torch._inductor": lambda tree, other: _global_in_metadata("torch", "_inductor")(tree),
    ".metadata names a DCP planner dataclass": lambda tree, other: _global_in_metadata(
        "torch.distributed.checkpoint.planner", "SavePlan")(tree),
    ".metadata points a value at a pickle of bytearray(3 GiB)": lambda tree, other: _hostile_value(tree),
    "ckptfn.json nested 100,000 deep": lambda tree, other: _deep_json(tree),
    "ckptfn.json of 17 MiB": lambda tree, other: _big_json(tree),
}
#: The variants read_metadata cannot see (it reads ckptfn.json and lists the tree, never DCP's .metadata).
_LOAD_ONLY = {name for name in TREE_VARIANTS if name.startswith(".metadata")}


def _odd_tree(template: pathlib.Path, variant: str, reader: str) -> list:
    """(In a child.) A copy of ``template`` (run/best.dcp and other/best.dcp) made odd one way, then read."""
    import time

    work = pathlib.Path(tempfile.mkdtemp())
    try:
        shutil.copytree(template, work, dirs_exist_ok=True)
        tree, other = work / "run" / "best.dcp", work / "other" / "best.dcp"
        TREE_VARIANTS[variant](tree, other)
        started = time.monotonic()
        try:
            if reader == "read_metadata":
                ckptfn.read_metadata(tree)
            elif reader == "load_checkpoint":
                ckptfn.load_checkpoint(tree)
            elif reader == "load_sharded":
                ckptfn.load_sharded(tree, {"w": torch.zeros(4), "n": 0})
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    best = CheckpointManager(work / "run", [LOSS], resume=True).best_values["best.pt"]
                if variant in _LOAD_ONLY:
                    return []  # ckptfn.json and the tree's entries are sound; every load refuses (above)
                return [("corruption", f"resumed a best of {best} from the tree")]
        except CheckpointError as error:
            if str(tree) not in str(error) and str(work / "run") not in str(error):
                return [("unexpected", f"the refusal does not name the tree: {error}")]
            took = time.monotonic() - started
            return [("unexpected", f"the refusal took {took:.1f} s")] if took > READ_SECONDS else []
        if reader == "read_metadata" and variant in _LOAD_ONLY:
            return []
        return [("corruption", f"{reader} accepted it")]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tree_template(work: pathlib.Path) -> pathlib.Path:
    """run/best.dcp and other/best.dcp (another run's, with other values) under ``work``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sharded_run(work / "run", 1.0)
        sharded_run(work / "other", 7.0)
    return work


TREE_READERS = ("read_metadata", "load_checkpoint", "load_sharded", "CheckpointManager(resume=True)")


def trees(tally: Tally, readers: tuple[str, ...] = TREE_READERS) -> None:
    with tempfile.TemporaryDirectory(prefix="ckptfn-trees-", dir=_ram()) as work:
        template = tree_template(pathlib.Path(work))
        for variant in TREE_VARIANTS:
            for reader in readers:
                _case(tally, TREE, f"{variant} via {reader}", _odd_tree, template, variant, reader, timeout=30)


def run(bomb_mib: int = 64) -> Tally:
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="ckptfn-hostile-") as work:
        work = pathlib.Path(work)
        pickles(tally, work)
        bombs(tally, work, bomb_mib)
        symlinks(tally, work)
        traversals(tally)
        odd_files(tally)
        endless(tally)
        allocations(tally)
        zips(tally)
        trees(tally)
    return tally
