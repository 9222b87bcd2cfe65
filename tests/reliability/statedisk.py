"""The manager's state never disagrees with the disk: interrupts, other PID namespaces, clock
steps, an earlier run's checkpoints, files that cannot be judged.

Each part is run for real (child processes receive real SIGINTs; a second writer runs under
``unshare -p``) and counted in the reliability report like the other faults: a disagreement
between what the manager believes and what the files hold, or a better file replaced by a
worse one, is "data lost"; an undocumented exception is "unexpected".
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import tempfile
import warnings

import ckptfn
from ckptfn import CheckpointError, CheckpointManager, Strategy
from ckptfn.core.metadata import entry_for
from tests.reliability.common import ROOT, Tally

SECTION = "fault"
UTC = dt.timezone.utc


def interrupts(tally: Tally, *, epochs: int, seeds: tuple[int, ...]) -> None:
    from tests.shells.test_interrupts import interrupted_run

    for mode in ("sync", "async"):
        kind = f"interrupts (real SIGINTs), {mode}"
        tally.tried(SECTION, kind, 0)
        for seed in seeds:
            with tempfile.TemporaryDirectory(prefix="ckptfn-sigint-") as work:
                result = interrupted_run(pathlib.Path(work) / "run", mode, epochs=epochs, seed=seed, python_path=str(ROOT))
            tally.tried(SECTION, kind, result["interrupted"])
            for _ in range(result["disagreements"]):
                tally.problem(SECTION, kind, "lost", f"seed {seed}: the manager's bests disagreed with the files")


def namespaces(tally: Tally, *, seconds: float) -> dict[str, str]:
    from tests.io.test_liveness import can_unshare, race

    kind = "a writer in another PID namespace"
    if not can_unshare():
        return {kind.strip(): "needs unshare -p (root on Linux)"}
    with tempfile.TemporaryDirectory(prefix="ckptfn-pidns-") as work:
        result = race(pathlib.Path(work) / "run", str(ROOT), seconds=seconds)
    tally.tried(SECTION, kind, result["here"]["saves"] + result["here"]["failures"])
    for _ in range(result["here"]["failures"]):
        tally.problem(SECTION, kind, "lost", "a live writer's temporary file was removed by the other writer")
    return {}


def clock_steps(tally: Tally, *, histories: int) -> None:
    """Random clocks jumping back and forth: keep=k always keeps the k newest saves."""
    import random

    kind = "clock steps back (keep)"
    rng = random.Random(0)
    for index in range(histories):
        keep, count = rng.randint(1, 3), rng.randint(2, 8)
        strategy = Strategy("val_corr", mode="max", filename="best.pt", overwrite=False, keep=keep)
        state = ckptfn.init(strategy)
        with tempfile.TemporaryDirectory(prefix="ckptfn-clock-") as work:
            for epoch in range(count):
                state, actions = ckptfn.step(state, {"val_corr": float(epoch)}, epoch)
                now = dt.datetime(2026, 1, 1, tzinfo=UTC) + dt.timedelta(seconds=rng.randint(0, 10**6))
                ckptfn.execute(actions, {"epoch": epoch}, work, state=state, now=now)
            kept = sorted(ckptfn.read_metadata(pathlib.Path(work) / n)["epoch"] for n in os.listdir(work))
        tally.tried(SECTION, kind)
        if kept != list(range(count))[-keep:]:
            tally.problem(SECTION, kind, "lost", f"history {index}: kept epochs {kept} of {count} with keep={keep}")


def earlier_runs(tally: Tally) -> None:
    """A new manager (no resume given) in a directory with a better checkpoint never replaces it."""
    kind = "an earlier run's checkpoints"
    config = [{"metric_name": "val_loss"}, {"metric_name": "val_corr", "mode": "max", "overwrite": False}]
    with tempfile.TemporaryDirectory(prefix="ckptfn-earlier-") as work:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CheckpointManager(work, config).update({"val_loss": 0.4866, "val_corr": 0.9}, {"w": 8}, 8)
            for epoch, (loss, corr) in enumerate([(0.6643, 0.5), (0.7, 0.6), (0.5, 0.8)]):
                tally.tried(SECTION, kind)
                CheckpointManager(work, config).update({"val_loss": loss, "val_corr": corr}, {"w": epoch}, epoch)
                held = {n: entry_for(ckptfn.read_metadata(pathlib.Path(work) / n), n)["value"]
                        for n in ("best_val_loss.pt", "best_val_corr.pt")}
                if held != {"best_val_loss.pt": 0.4866, "best_val_corr.pt": 0.9}:
                    tally.problem(SECTION, kind, "lost", f"a worse epoch replaced a better file: {held}")


def unjudgeable(tally: Tally) -> None:
    """Resuming over a file that cannot be judged: refused naming it; the file is untouched."""
    kind = "a file that cannot be judged at resume"
    cases = {
        "damaged": b"PK\x03\x04 torn",
        "another format": None,
        "not a checkpoint": b"someone's notes",
    }
    for name, data in cases.items():
        tally.tried(SECTION, kind)
        with tempfile.TemporaryDirectory(prefix="ckptfn-odd-") as work:
            path = pathlib.Path(work) / "best_val_loss.pt"
            if data is None:
                import torch

                torch.save({"state_dict": {}, "metadata": {"format": "ckptfn/2", "saves": []}}, path)
            else:
                path.write_bytes(data)
            before = path.read_bytes()
            for resume in (None, True):
                try:
                    CheckpointManager(work, [{"metric_name": "val_loss"}], resume=resume)
                    tally.problem(SECTION, kind, "lost", f"{name}: resume={resume} took it for absent")
                except CheckpointError as error:
                    if str(path) not in str(error):
                        tally.problem(SECTION, kind, "unexpected", f"{name}: the error does not name the file")
            if path.read_bytes() != before:
                tally.problem(SECTION, kind, "lost", f"{name}: the file was changed")


def run(*, epochs: int = 120, seeds: tuple[int, ...] = (3, 4), seconds: float = 4.0, histories: int = 40) -> tuple[Tally, dict[str, str]]:
    """Every part; the tally and the parts this machine cannot run (with why)."""
    tally = Tally()
    interrupts(tally, epochs=epochs, seeds=seeds)
    unavailable = namespaces(tally, seconds=seconds)
    clock_steps(tally, histories=histories)
    earlier_runs(tally)
    unjudgeable(tally)
    return tally, unavailable
