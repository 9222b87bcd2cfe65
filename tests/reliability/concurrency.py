"""Two processes with managers on one directory, saving in a loop, while a reader polls.

Phase 1: different filenames (each process its own ``overwrite=True`` and
``overwrite=False`` names). Phase 2: the same filenames. The reader (this
process) lists the directory over and over and loads every file it sees with
``load_checkpoint``: each must load completely and hold one consistent snapshot.
Afterwards no temporary file is left, and in phase 1 every version a writer
archived is still there.

With the same ``overwrite=False`` name, two writers can each archive what they
saw and then replace each other's new file, so a version may never be archived:
the count is reported (``superseded``), not treated as loss, because two managers
sharing one name is a configuration that cannot keep every version anyway.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
import time
import warnings

import torch

import ckptfn
from ckptfn import CheckpointError, CheckpointManager
from ckptfn.core.naming import archived_of

from tests.reliability.common import Tally, forkserver, temps, visible

SECTION = "fault"
DIFFERENT = "2 writers, different filenames (reads)"
SAME = "2 writers, same filename (reads)"


def strategies(prefix: str) -> list[dict]:
    return [
        {"metric_name": "val_loss", "filename": f"{prefix}loss.pt"},
        {"metric_name": "val_corr", "mode": "max", "filename": f"{prefix}corr.pt", "overwrite": False},
    ]


def writer(directory: str, prefix: str, name: str, seconds: float, elements: int, report: str) -> None:
    """Save an improving epoch (both strategies) as often as possible for ``seconds``; report how
    many versions of ``corr.pt`` it wrote (a resumed writer may save only one of the two names)."""
    torch.set_num_threads(1)
    saves, error = 0, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manager = CheckpointManager(directory, strategies(prefix))
            deadline, epoch = time.monotonic() + seconds, 0
            while time.monotonic() < deadline:
                payload = {"model": {"w": torch.full((elements,), float(epoch))}, "epoch": epoch, "writer": name}
                paths = manager.update({"val_loss": 1.0 / (epoch + 1), "val_corr": float(epoch)}, payload, epoch)
                saves += any(path.name == f"{prefix}corr.pt" for path in paths)  # a version of corr.pt written
                epoch += 1
    except Exception as error_:  # noqa: BLE001 - reported to the parent
        error = f"{type(error_).__name__}: {error_}"
    pathlib.Path(report).write_text(json.dumps({"saves": saves, "error": error}))


def consistent(state_dict: object, metadata: dict) -> str | None:
    try:
        epoch = state_dict["epoch"]
        if epoch != metadata.get("epoch") or not bool(torch.all(state_dict["model"]["w"] == float(epoch))):
            return f"not one snapshot (payload epoch {epoch}, metadata epoch {metadata.get('epoch')})"
    except (KeyError, TypeError) as error:
        return f"unexpected payload ({error!r})"
    return None


def phase(tally: Tally, kind: str, base: pathlib.Path, prefixes: tuple[str, str], seconds: float, elements: int) -> int:
    """Run two writers and poll; returns how many versions were superseded without being archived."""
    directory = base / "run"
    directory.mkdir(parents=True)
    context = forkserver()
    reports = [base / f"writer{i}.json" for i in range(2)]
    processes = [
        context.Process(target=writer, args=(str(directory), prefix, f"w{i}", seconds, elements, str(report)))
        for i, (prefix, report) in enumerate(zip(prefixes, reports))
    ]
    for process in processes:
        process.start()
    while any(process.is_alive() for process in processes):
        for name in visible(directory):
            tally.tried(SECTION, kind)
            try:
                state_dict, metadata = ckptfn.load_checkpoint(directory / name)
            except CheckpointError as error:
                tally.problem(SECTION, kind, "corruption", f"{name} does not load while written: {error}")
                continue
            problem = consistent(state_dict, metadata)
            if problem:
                tally.problem(SECTION, kind, "corruption", f"{name}: {problem}")
    for process in processes:
        process.join()
    results = [json.loads(report.read_text()) if report.exists() else {"saves": 0, "error": "no report"} for report in reports]
    for result in results:
        if result["error"]:
            tally.problem(SECTION, kind, "unexpected", f"a writer failed: {result['error']}")
    if temps(directory):
        tally.problem(SECTION, kind, "unexpected", f"temporary files left: {temps(directory)}")
    for name in visible(directory):  # and once more at rest
        try:
            problem = consistent(*ckptfn.load_checkpoint(directory / name))
        except CheckpointError as error:
            problem = f"does not load at rest: {error}"
        if problem:
            tally.problem(SECTION, kind, "corruption", f"{name}: {problem}")
    superseded = 0
    names = visible(directory)
    if prefixes[0] != prefixes[1]:
        for prefix, result in zip(prefixes, results):
            versions = sum(1 for n in names if n == f"{prefix}corr.pt" or archived_of(n, f"{prefix}corr.pt"))
            if versions != result["saves"]:
                tally.problem(SECTION, kind, "lost", f"{prefix}corr.pt: {result['saves']} saves but {versions} versions kept")
    else:
        versions = sum(1 for n in names if n == f"{prefixes[0]}corr.pt" or archived_of(n, f"{prefixes[0]}corr.pt"))
        superseded = sum(result["saves"] for result in results) - versions
    shutil.rmtree(directory)
    return superseded


def run(seconds: float = 10.0, elements: int = 1 << 18) -> tuple[Tally, int]:
    """Both phases; returns the tally and the same-name versions superseded before being archived."""
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="ckptfn-race-") as work:
        work = pathlib.Path(work)
        phase(tally, DIFFERENT, work / "different", ("a_", "b_"), seconds, elements)
        superseded = phase(tally, SAME, work / "same", ("shared_", "shared_"), seconds, elements)
    return tally, superseded
