"""What training feels while a checkpoint is written: the step time of a CPU training loop.

    python tests/benchmarks/step_time.py [--mb SIZE] [--every N] [--repeat N] [--threads N]
                                         [--width N] [--batch N] [--only WRITERS] [--dir DIR] [--write-readme]

A training loop (an MLP of 4 ``Linear(width, width)`` layers trained with Adam on
one fixed batch, ``torch.set_num_threads(--threads)``, all the CPUs by default)
saves a payload of ``--mb`` MiB (its model and optimizer state dicts, filled up
with float32 tensors to that size) with ``CheckpointManager.update`` once every
``--every`` steps. One *period* is ``--every`` steps; a saving period calls
``update`` at its first step and ``wait()`` after its last (so a save that
outlasts the period is paid for in it). Each writer's saving period is timed
side by side with a period of the same loop without saving (in alternating
order, repeated ``--repeat`` times, the writers in rotating order within each
repetition), in one process, so slow phases of the machine hit both sides. Two
ratios per writer, each the median over the repetitions of the per-pair ratio:

- *while saving* (``a`` rows): the median time of the steps that start while the
  save is in flight (the first one, with the ``update`` call, included) / the
  median step time of the period without saving: what the loop feels during a save;
- *per period* (``b`` rows): the whole saving period (``update`` and ``wait()``
  included) / the period without saving: the training throughput lost to saving.

The writers (``--only`` picks some): synchronous ``update``; ``async_save=True``
(one background thread), with and without ``checksums=False``; then the thread
again with the loop on one torch thread (a core left for the writer; both sides of
that pair run on one thread). A writer process with shared-memory staging was built and
measured against the thread in the same way; it did not beat the thread (the cost is
cores, not the GIL: see the README's Performance section), so it is not part of ckptfn. Files go to a temporary directory under
``--dir`` (default: the system's temporary directory; use a real disk), removed
afterwards. The table goes to stdout, progress to stderr; ``--write-readme``
also writes it into the ``step-time`` region of README.md (see
tests/readme_regions.py).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make ``tests.benchmarks`` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch

import ckptfn
from tests.benchmarks.measure import COLUMNS, Row, filesystem_of, mib, render, seconds

__all__ = ["COLUMNS", "REGION", "main"]

REGION = "step-time"
#: The rows whose "while saving" ratio has a target (issue 16: async <= 1.15 on the 2-core machine).
TARGETED = ("thread",)
TARGET = "<= 1.15"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the training loop ---------------------------------------------------------------------


class Training:
    """An MLP, its Adam optimizer and one batch; ``step()`` is one optimizer step."""

    def __init__(self, width: int, batch: int, layers: int = 4, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        modules: list[torch.nn.Module] = []
        for index in range(layers):
            modules += [torch.nn.Linear(width, width)] + ([torch.nn.ReLU()] if index < layers - 1 else [])
        self.model = torch.nn.Sequential(*modules)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(batch, width, generator=generator)
        self.y = torch.randn(batch, width, generator=generator)
        self.steps = 0

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.steps += 1

    def payload(self, megabytes: float) -> tuple[dict, int]:
        """The model and optimizer state dicts, plus float32 ``filler`` tensors up to ``megabytes`` MiB
        (16 tensors, fixed: the loop does not change them); and the model-and-optimizer bytes."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        own = sum(t.nbytes for t in _tensors(state))
        missing = max(0, int(megabytes * 2**20) - own) // 4
        filler = collections.OrderedDict(
            (f"filler.{index}", torch.randn(missing // 16)) for index in range(16) if missing >= 16
        )
        return {**state, "filler": filler}, own


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


# --- the writers ---------------------------------------------------------------------------


class Saver:
    """One way of saving: a manager that saves at every ``save()`` (``Every(1)``, one epoch per call)."""

    def __init__(self, directory: pathlib.Path, **options: object) -> None:
        self.manager = ckptfn.CheckpointManager(
            directory, ckptfn.Every(1, filename="last.pt"), resume=False, **options
        )
        self.epoch = 0

    def save(self, payload: object) -> None:
        paths = self.manager.update({}, payload, self.epoch)
        assert paths, "every update must save"
        self.epoch += 1

    def in_flight(self) -> bool:
        """Whether the save handed over last is still being written (never, when synchronous)."""
        writer = self.manager._writer  # the benchmark peeks: the manager has no public "still writing?"
        if writer is None:
            return False
        if hasattr(writer, "running"):
            return writer.running()
        future = writer._future
        return future is not None and not future.done()

    def finish(self) -> None:
        self.manager.wait()

    def close(self) -> None:
        self.manager.close()


@dataclass(frozen=True)
class Writer:
    """A writer to compare: its row label, how to make it, and the torch threads of its pairs (None: ``--threads``)."""

    label: str
    make: Callable[[pathlib.Path], Saver]
    threads: int | None = None


def writers() -> dict[str, Writer]:
    """The writers to compare, in row order."""
    made = {
        "sync": Writer("sync `update`", lambda d: Saver(d)),
        "thread": Writer("async thread", lambda d: Saver(d, async_save=True)),
        "thread-nocrc": Writer("async thread, `checksums=False`",
                               lambda d: Saver(d, async_save=True, checksums=False)),
    }
    made["thread-1t"] = Writer("async thread, loop on 1 torch thread", made["thread"].make, threads=1)
    return made


# --- one period ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """The step times of one period, which of them started while a save was in flight, and its wall time."""

    steps: tuple[float, ...]
    during: tuple[bool, ...]
    total: float

    @property
    def median(self) -> float:
        return statistics.median(self.steps)

    @property
    def median_while_saving(self) -> float:
        return statistics.median(t for t, busy in zip(self.steps, self.during) if busy)

    @property
    def saving_steps(self) -> int:
        return sum(self.during)


def period(training: Training, payload: object, steps: int, saver: Saver | None = None) -> Period:
    """``steps`` training steps; with ``saver``, a save at the first one and ``finish()`` after the last."""
    times, during = [], []
    started = time.perf_counter()
    for index in range(steps):
        begin = time.perf_counter()
        busy = False
        if saver is not None:
            if index == 0:
                saver.save(payload)
                busy = True
            else:
                busy = saver.in_flight()
        training.step()
        times.append(time.perf_counter() - begin)
        during.append(busy)
    if saver is not None:
        saver.finish()
    return Period(tuple(times), tuple(during), time.perf_counter() - started)


# --- the measurement -----------------------------------------------------------------------


@dataclass(frozen=True)
class Paired:
    """The saving periods of one writer and the periods without saving timed next to each of them."""

    saving: tuple[Period, ...]
    plain: tuple[Period, ...]

    def while_saving(self) -> list[float]:
        return [s.median_while_saving / p.median for s, p in zip(self.saving, self.plain)]

    def per_period(self) -> list[float]:
        return [s.total / p.total for s, p in zip(self.saving, self.plain)]


def measure(args, training: Training, payload: object, savers: dict[str, Saver],
            threads: dict[str, int]) -> tuple[dict[str, Paired], Paired]:
    """Every writer's saving period paired with a period without saving, ``args.repeat`` times, on
    ``threads[key]`` torch threads; and the noise floor (two periods without saving, paired the same way)."""
    saving: dict[str, list[Period]] = {key: [] for key in savers}
    plain: dict[str, list[Period]] = {key: [] for key in savers}
    floor_a, floor_b = [], []
    keys = list(savers)
    for repetition in range(args.repeat):
        rotated = keys[repetition % len(keys):] + keys[: repetition % len(keys)]
        first = repetition % 2 == 0
        for key in ["noise", *rotated]:
            torch.set_num_threads(threads.get(key, args.threads))
            if key == "noise":
                a, b = period(training, payload, args.every), period(training, payload, args.every)
                floor_a.append(a if first else b)
                floor_b.append(b if first else a)
            elif first:
                saving[key].append(period(training, payload, args.every, savers[key]))
                plain[key].append(period(training, payload, args.every))
            else:
                plain[key].append(period(training, payload, args.every))
                saving[key].append(period(training, payload, args.every, savers[key]))
        log(f"repetition {repetition + 1}/{args.repeat} done")
    torch.set_num_threads(args.threads)
    pairs = {key: Paired(tuple(saving[key]), tuple(plain[key])) for key in savers}
    return pairs, Paired(tuple(floor_a), tuple(floor_b))


def spread(ratios: list[float]) -> str:
    return f"pairs {min(ratios):.2f}-{max(ratios):.2f}"


def rows_for(args, pairs: dict[str, Paired], floor: Paired, labels: dict[str, str]) -> list[Row]:
    """The table: the noise floor, then per writer its "while saving" (a) and "per period" (b) ratios
    (the synchronous writer: per period only), numbered in the order of ``writers()``."""
    every = args.every
    floor_ratios = [a.median / b.median for a, b in zip(floor.saving, floor.plain)]
    rows = [
        Row("0", "noise floor (A/A): median step time, no save / the same", statistics.median(floor_ratios),
            "report", f"step {seconds(statistics.median(a.median for a in floor.saving))}, "
                      f"{seconds(statistics.median(b.median for b in floor.plain))}; {spread(floor_ratios)}"),
    ]
    order = list(writers())
    for key, pair in pairs.items():
        label, number = labels[key], str(order.index(key) + 1)
        per_period = pair.per_period()
        first = statistics.median(s.steps[0] for s in pair.saving)
        period_detail = (f"period {seconds(statistics.median(s.total for s in pair.saving))}, no save "
                         f"{seconds(statistics.median(p.total for p in pair.plain))}; the step with `update` "
                         f"{seconds(first)}; {spread(per_period)}")
        if key == "sync":
            rows.append(Row(number, f"sync `update` every {every} steps: time per period / no save",
                            statistics.median(per_period), "report", period_detail))
            continue
        while_saving = pair.while_saving()
        counted = statistics.median(s.saving_steps for s in pair.saving)
        rows.append(Row(f"{number}a", f"{label}: median step time while a save is in flight / no save",
                        statistics.median(while_saving), TARGET if key in TARGETED else "report",
                        f"step {seconds(statistics.median(s.median_while_saving for s in pair.saving))} "
                        f"({counted:g} of {every} steps saving), no save "
                        f"{seconds(statistics.median(p.median for p in pair.plain))}; {spread(while_saving)}"))
        rows.append(Row(f"{number}b", f"{label}: time per period of {every} steps, `update` and `wait()` "
                                      f"included / no save", statistics.median(per_period), "report", period_detail))
    return rows


def main(argv: list[str] | None = None) -> int:
    available = writers()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256.0, help="payload size in MiB (default 256)")
    parser.add_argument("--every", type=int, default=40, help="steps per period: one save each (default 40)")
    parser.add_argument("--repeat", type=int, default=7, help="paired repetitions (default 7)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch.set_num_threads of the loop (default: the CPU count)")
    parser.add_argument("--width", type=int, default=1024, help="width of the MLP's 4 layers (default 1024)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--only", default=",".join(available), help="comma-separated writers, of: %(default)s")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp directory)")
    parser.add_argument("--write-readme", action="store_true", help=f"also write the table into README.md ({REGION})")
    args = parser.parse_args(argv)
    chosen = args.only.split(",")
    unknown = [key for key in chosen if key not in available]
    if unknown:
        parser.error(f"unknown writers {unknown}; the writers are {list(available)}")
    chosen = [key for key in available if key in chosen]  # row order
    started = time.monotonic()
    torch.set_num_threads(args.threads)
    directory = pathlib.Path(tempfile.mkdtemp(prefix="ckptfn-step-time-", dir=args.dir))
    fs_type = filesystem_of(str(directory))
    training = Training(args.width, args.batch)
    training.step()  # the optimizer's state exists before the payload is taken
    payload, own = training.payload(args.mb)
    size = sum(t.nbytes for t in _tensors(payload))
    threads = {key: available[key].threads for key in chosen if available[key].threads is not None}
    savers: dict[str, Saver] = {}
    try:
        for key in chosen:
            savers[key] = available[key].make(directory / key)
        log(f"warm-up: {args.every} steps, one saving period per writer")
        for _ in range(args.every):
            training.step()
        for key, saver in savers.items():  # the first save allocates staging buffers, starts threads/processes
            torch.set_num_threads(threads.get(key, args.threads))
            period(training, payload, args.every, saver)
        pairs, floor = measure(args, training, payload, savers, threads)
    finally:
        for saver in savers.values():
            saver.close()
        shutil.rmtree(directory, ignore_errors=True)
    rows = rows_for(args, pairs, floor, {key: available[key].label for key in chosen})
    header = (
        f"ckptfn {ckptfn.__version__} step time: an MLP of 4 `Linear({args.width}, {args.width})` layers, "
        f"Adam, batch {args.batch}, `torch.set_num_threads({args.threads})` unless the row says otherwise; "
        f"payload {mib(size)} (model and optimizer {mib(own)}, the rest float32 filler), one save every "
        f"{args.every} steps; median of {args.repeat} paired repetitions; torch {torch.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs; files in {fs_type} ({directory.parent})"
    )
    print(header)
    print()
    print(render(rows))
    log(f"{time.monotonic() - started:.1f} s")
    if args.write_readme:
        from tests.readme_regions import measured_note, write_region

        command = " ".join(["python tests/benchmarks/step_time.py", *(sys.argv[1:] if argv is None else argv)])
        write_region(REGION, measured_note(command, header) + "\n\n" + render(rows))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
