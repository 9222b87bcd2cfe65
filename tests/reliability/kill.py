"""Kill test: SIGKILL a training process at random moments, many of them during a write.

A child process fakes training (random metrics with a trend, a random payload of
8-64 MiB) and saves every epoch through ``CheckpointManager(resume=True)`` with
three strategies: two ``overwrite=True`` (sharing writes) and one
``overwrite=False``. The driver kills it with SIGKILL, either at a random moment
or right after the child's temporary file appears (so the kill lands inside a
write), then checks:

- every file under a configured or archived name loads with ``load_checkpoint``
  and holds one consistent snapshot (no partial file under a final name);
- a new ``CheckpointManager(resume=True)`` restores bests that match the files,
  and each is what the child had committed or was writing when it died;
- the next run's first save removes the dead child's temporary files;
- across restarts no best ever gets worse and no archived version disappears
  (continuing never replaces a better checkpoint with a worse one).

Several trials share a run directory (each child resumes from what the previous
one left), then a fresh directory starts.

    python tests/reliability/kill.py --trials 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings

if __name__ == "__main__":  # run as a script: make `tests` importable, then run the module proper
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from tests.reliability.kill import main

    sys.exit(main())

import torch

import ckptfn
from ckptfn import CheckpointManager
from ckptfn.core.metadata import entry_for
from ckptfn.core.naming import archived_of

from tests.reliability.common import Tally, forkserver, file_bests, inspect, temps, temps_of

SECTION = "fault"
KILLS = "SIGKILL of a training process"
IN_WRITE = "  of which during a write"

STRATEGIES = [
    {"metric_name": "val_loss", "filename": "best_loss.pt"},
    {"metric_name": "loss_components.concordance", "filename": "best_concordance.pt"},
    {"metric_name": "val_corr", "mode": "max", "filename": "best_corr.pt", "overwrite": False},
]
CONFIG = ckptfn.Config.from_mapping(STRATEGIES)
MARK = 1024  # the first MARK weights of every payload hold its epoch


def fake_metrics(rng: random.Random, epoch: int) -> dict:
    """A noisy trend: most epochs improve something, some nothing."""
    trend = 1.0 / (1.0 + 0.3 * epoch)
    return {
        "val_loss": trend * rng.uniform(0.85, 1.25),
        "loss_components": {"concordance": trend * rng.uniform(0.7, 1.5)},
        "val_corr": (1.0 - trend) * rng.uniform(0.8, 1.1),
    }


def train(directory: str, log_path: str, seed: int, elements: int) -> None:
    """The child: resume, then train forever (until killed), saving through the manager."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def say(**record) -> None:  # one write per line: a kill never leaves half a record
        os.write(log, (json.dumps({"time": time.monotonic(), **record}) + "\n").encode())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = CheckpointManager(directory, STRATEGIES, resume=True)
    say(event="start", pid=os.getpid(), bests=manager.best_values)
    rng = random.Random(seed)
    weights = torch.rand(elements, generator=torch.Generator().manual_seed(seed))
    epoch = manager.state.steps
    while True:
        metrics = fake_metrics(rng, epoch)
        weights[:MARK] = float(epoch)
        payload = {"model": {"w": weights}, "epoch": epoch, "sum": float(weights.sum(dtype=torch.float64))}
        say(event="update", epoch=epoch, metrics=metrics)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            written = manager.update(metrics, payload, epoch)
        say(event="done", epoch=epoch, written=[p.name for p in written], bests=manager.best_values)
        epoch += 1


def payload_problem(state_dict: object, metadata: dict) -> str | None:
    """Why a loaded file is not one consistent snapshot of the child (None when it is)."""
    try:
        weights, epoch = state_dict["model"]["w"], state_dict["epoch"]
        if epoch != metadata.get("epoch"):
            return f"payload epoch {epoch}, metadata epoch {metadata.get('epoch')}"
        if not bool(torch.all(weights[:MARK] == float(epoch))):
            return f"the weights do not carry epoch {epoch}"
        if not math.isclose(float(weights.sum(dtype=torch.float64)), state_dict["sum"], rel_tol=1e-12, abs_tol=1e-6):
            return "the weights do not add up to the recorded sum (mixed or damaged data)"
    except (KeyError, TypeError, IndexError) as error:
        return f"unexpected payload ({error!r})"
    return None


def _value(metrics: dict, metric_name: str) -> float | None:
    node = metrics
    for part in metric_name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class Session:
    """One run directory, restarted many times; remembers what each check saw."""

    def __init__(self, directory: pathlib.Path, elements: int) -> None:
        self.directory = directory
        self.elements = elements
        self.seen: dict[str, float] = {}  # filename -> last best value seen in its file
        self.versions: dict[str, tuple] = {}  # archive identity (timestamp) -> value, of best_corr.pt
        self.stale: set[str] = set()  # temporary files of killed children, due for removal

    def check(self, tally: Tally, log_path: pathlib.Path, killed: int, where: str) -> None:
        records = _records(log_path)
        holdings = inspect(self.directory, CONFIG, payload_problem)
        for name, holding in holdings.items():
            if holding.problem:
                tally.problem(SECTION, KILLS, "corruption", f"{where}: {name}: {holding.problem}")
        on_disk = file_bests(holdings, CONFIG)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                resumed = CheckpointManager(self.directory, STRATEGIES, resume=True).best_values
        except Exception as error:  # noqa: BLE001
            tally.problem(SECTION, KILLS, "unexpected", f"{where}: resume failed: {type(error).__name__}: {error}")
            return
        if resumed != on_disk:
            tally.problem(SECTION, KILLS, "corruption", f"{where}: resumed {resumed}, the files hold {on_disk}")
        self._check_against_log(tally, records, resumed, where)
        self._check_monotone(tally, holdings, resumed, where)
        wrote = any(r["event"] == "done" and r["written"] for r in records)
        if wrote and self.stale & set(temps(self.directory)):
            tally.problem(SECTION, KILLS, "unexpected", f"{where}: stale temporary files survived a save: {sorted(self.stale)}")
        if wrote:
            self.stale = set()
        self.stale |= set(temps_of(self.directory, killed))

    def _check_against_log(self, tally: Tally, records: list, resumed: dict, where: str) -> None:
        """Each best is what the child committed, or the value it was writing when it died."""
        starts = [r for r in records if r["event"] == "start"]
        if not starts:
            return  # killed before it even resumed
        committed = dict(starts[-1]["bests"])
        in_flight = None
        for record in records:
            if record["event"] == "update":
                in_flight = record["metrics"]
            elif record["event"] == "done":
                committed, in_flight = dict(record["bests"]), None
        for strategy in CONFIG.strategies:
            allowed = {committed[strategy.filename]}
            if in_flight is not None:
                allowed.add(_value(in_flight, strategy.metric_name))
            if resumed[strategy.filename] not in allowed:
                tally.problem(
                    SECTION, KILLS, "lost",
                    f"{where}: {strategy.filename} holds {resumed[strategy.filename]}, the child had {sorted(allowed, key=str)}",
                )

    def _check_monotone(self, tally: Tally, holdings: dict, resumed: dict, where: str) -> None:
        """No best ever gets worse, no archived version ever disappears."""
        for strategy in CONFIG.strategies:
            old, new = self.seen.get(strategy.filename), resumed[strategy.filename]
            if old is not None and (new is None or (new > old if strategy.mode == "min" else new < old)):
                tally.problem(SECTION, KILLS, "lost", f"{where}: {strategy.filename} went from {old} to {new}")
            if new is not None:
                self.seen[strategy.filename] = new
        present = {}
        for name, holding in holdings.items():
            if holding.metadata and (name == "best_corr.pt" or archived_of(name, "best_corr.pt")):
                entry = entry_for(holding.metadata, "best_corr.pt")
                present[holding.metadata.get("timestamp")] = entry["value"] if entry else None
        missing = set(self.versions) - set(present)
        if missing:
            tally.problem(SECTION, KILLS, "lost", f"{where}: archived versions saved at {sorted(missing)} are gone")
        values = [present[stamp] for stamp in sorted(present)]
        if any(later <= earlier for earlier, later in zip(values, values[1:])):
            tally.problem(SECTION, KILLS, "lost", f"{where}: best_corr versions do not improve over time: {values}")
        self.versions = present

    def finish(self, tally: Tally, where: str) -> None:
        """A last, better-than-everything save by a fresh manager removes every stale temporary file."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manager = CheckpointManager(self.directory, STRATEGIES, resume=True)
            weights = torch.zeros(1 << 10)
            epoch = manager.state.steps
            weights[:MARK] = float(epoch)
            payload = {"model": {"w": weights}, "epoch": epoch, "sum": float(weights.sum(dtype=torch.float64))}
            manager.update({"val_loss": -1.0, "loss_components": {"concordance": -1.0}, "val_corr": 2.0}, payload, epoch)
        if temps(self.directory):
            tally.problem(SECTION, KILLS, "unexpected", f"{where}: temporary files left after a save: {temps(self.directory)}")
        for name, holding in inspect(self.directory, CONFIG, payload_problem).items():
            if holding.problem:
                tally.problem(SECTION, KILLS, "corruption", f"{where}: {name}: {holding.problem}")


def _wait_for_temp(directory: pathlib.Path, pid: int, process, timeout: float) -> bool:
    """Poll until ``pid``'s temporary file appears (True) or the child dies / time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.is_alive():
        if temps_of(directory, pid):  # the one name grammar, never a hand-made prefix
            return True
        time.sleep(0.0005)
    return False


def run(
    trials: int,
    *,
    mib: tuple[float, float] = (8, 64),
    restarts: int = 5,
    seed: int = 0,
    workdir: pathlib.Path | None = None,
    in_write_share: float = 0.7,
    delay_fraction: float = 0.7,
    progress: bool = False,
) -> Tally:
    """``trials`` kills; returns the tally (kills, kills during a write, problems).

    A share ``in_write_share`` of the kills waits for the child's temporary file to
    appear and then up to ``delay_fraction`` of a typical write; the others come at
    a random moment (while resuming, serializing, publishing or between epochs).
    """
    rng = random.Random(seed)
    context = forkserver()
    tally = Tally()
    tally.tried(SECTION, KILLS, 0)  # (the rows in this order)
    tally.tried(SECTION, IN_WRITE, 0)
    base = pathlib.Path(tempfile.mkdtemp(prefix="ckptfn-kill-", dir=workdir))
    write_time = 0.05  # seconds; learned from the children's logs
    session = None
    try:
        for trial in range(trials):
            if trial % restarts == 0:
                if session is not None:
                    session.finish(tally, f"session ending at trial {trial}")
                    shutil.rmtree(session.directory)
                elements = int(rng.uniform(*mib) * (1 << 18))
                session = Session(base / f"run{trial}", elements)
            log_path = base / f"log{trial}.jsonl"
            process = context.Process(
                target=train, args=(str(session.directory), str(log_path), rng.randrange(1 << 30), session.elements)
            )
            process.start()
            if rng.random() < in_write_share:
                _wait_for_temp(session.directory, process.pid, process, timeout=30)
                time.sleep(rng.uniform(0, delay_fraction * write_time))
            else:
                time.sleep(rng.uniform(0, 4 * write_time + 0.3))
            os.kill(process.pid, signal.SIGKILL)
            process.join()
            tally.tried(SECTION, KILLS)
            if temps_of(session.directory, process.pid):
                tally.tried(SECTION, IN_WRITE)
            where = f"trial {trial} (pid {process.pid})"
            session.check(tally, log_path, process.pid, where)
            write_time = _learn_write_time(log_path, write_time)
            log_path.unlink(missing_ok=True)
            if progress:
                print(f"trial {trial + 1}/{trials}: {tally.count(SECTION, IN_WRITE)} kills during a write, "
                      f"{len(tally.problems)} problems", file=sys.stderr)
        if session is not None:
            session.finish(tally, "last session")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return tally


def _records(log_path: pathlib.Path) -> list[dict]:
    """A child's log (empty if it was killed before it opened it)."""
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def _learn_write_time(log_path: pathlib.Path, current: float) -> float:
    """The typical duration of an ``update`` that wrote, from a child's log."""
    records = _records(log_path)
    durations = [
        done["time"] - update["time"]
        for update, done in zip(records, records[1:])
        if update["event"] == "update" and done["event"] == "done" and done["written"]
    ]
    return max(durations) if durations else current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SIGKILL training processes at random moments and check every file.")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--min-mib", type=float, default=8)
    parser.add_argument("--max-mib", type=float, default=64)
    parser.add_argument("--restarts", type=int, default=5, help="kills per run directory before a fresh one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="where to put the run directories")
    args = parser.parse_args(argv)
    started = time.monotonic()
    tally = run(args.trials, mib=(args.min_mib, args.max_mib), restarts=args.restarts, seed=args.seed,
                workdir=args.dir, progress=True)
    corruptions = sum(row.corruption for row in tally.rows.values())
    lost = sum(row.lost for row in tally.rows.values())
    unexpected = sum(row.unexpected for row in tally.rows.values())
    print(f"trials: {tally.count(SECTION, KILLS)}")
    print(f"kills during a write: {tally.count(SECTION, IN_WRITE)}")
    print(f"corruptions: {corruptions}")
    print(f"data lost: {lost}")
    print(f"unexpected errors: {unexpected}")
    print(f"payload: {args.min_mib:g}-{args.max_mib:g} MiB, {time.monotonic() - started:.0f} s")
    for problem in tally.problems[:20]:
        print("  " + problem)
    return 0 if not tally.problems else 1
