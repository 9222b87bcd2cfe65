"""ckptfn's benchmark suite: one table of side-by-side ratios against the targets of issue 6.

    python tests/benchmarks/run.py [--mb SIZE] [--repeat N] [--epochs N] [--dir DIR] [--only IDS]

The payload is a state dict of 16 float32 tensors of ``--mb`` MiB in total
(256 by default). Row 4 writes a checkpoint of 4 x and one of 1/16 x that size
(1 GiB and 16 MiB by default); row 8 verifies one of 4 x (1 GiB). Files go to a
temporary directory under ``--dir`` (default: the system's temporary directory;
use a real disk, not a tmpfs), which is removed afterwards. The table goes to
stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import math
import os
import pathlib
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make ``tests.benchmarks`` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch

import ckptfn
from ckptfn import CheckpointManager, Save, Strategy, execute
from ckptfn.io.verify import CRC32_IMPLEMENTATION, verify_checkpoint
from ckptfn.shells.background import serialization_context
from tests.benchmarks.measure import (
    Row,
    bytes_written,
    filesystem_of,
    mib,
    paired,
    peak_rss_increase,
    render,
    seconds,
    timed,
)
from tests.benchmarks.plain import PlainTracker, plain_scan

TENSORS = 16
#: Repetitions of the tiny-payload pairs that measure a call's fixed cost (cheap, so many).
TINY_REPEAT = 41
IDS = ("1", "2", "3", "4", "5", "6", "7", "8")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_payload(megabytes: float, seed: int = 0) -> collections.OrderedDict:
    """A model-like state dict: 16 random float32 matrices, ``megabytes`` MiB in all."""
    per_tensor = max(256, int(megabytes * 2**20) // TENSORS // 4)
    columns = 1024 if per_tensor >= 1024 else 256
    generator = torch.Generator().manual_seed(seed)
    return collections.OrderedDict(
        (f"layers.{index}.weight", torch.randn(per_tensor // columns, columns, generator=generator))
        for index in range(TENSORS)
    )


def nbytes(payload) -> int:
    return sum(tensor.nbytes for tensor in payload.values())


def saves(count: int) -> list[Save]:
    """``count`` strategies improving in the same epoch."""
    return [Save(Strategy(f"metric_{i}", filename=f"best_{i}.pt"), 0, 0.5, None) for i in range(count)]


def write_raw(payload, path: pathlib.Path) -> None:
    """The physical baseline: the tensors' bytes, written and fsynced, then renamed into place."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb", buffering=0) as file:
        for tensor in payload.values():
            view = memoryview(tensor.numpy()).cast("B")
            while view:
                view = view[file.write(view) :]
        os.fsync(file.fileno())
    os.replace(temp, path)


def torch_save_fsync_replace(payload, path: pathlib.Path) -> None:
    """Row 1's baseline: bare ``torch.save`` into an open file, fsync, ``os.replace``."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def fixed_cost(ours, base, repeat: int):
    """What ``ours`` adds to ``base`` besides moving bytes: the difference of their medians on a tiny payload."""
    ours(), base()  # warm-up
    pair = paired(ours, base, repeat)
    return statistics.median(pair.first) - statistics.median(pair.second), pair


class Improving:
    """Metrics that improve every call, so every ``update`` saves."""

    def __init__(self) -> None:
        self.epochs = itertools.count()

    def __call__(self) -> tuple[dict, int]:
        epoch = next(self.epochs)
        return {"val_loss": 1.0 / (epoch + 1)}, epoch


# --- the rows ----------------------------------------------------------------------------------


def bench_single_save(args, payload, directory) -> list[Row]:
    one = saves(1)
    ours = lambda: execute(one, payload, directory / "single")  # noqa: E731
    bare = lambda: torch_save_fsync_replace(payload, directory / "single" / "bare.pt")  # noqa: E731
    again = lambda: torch_save_fsync_replace(payload, directory / "single" / "again.pt")  # noqa: E731
    ours(), bare(), again()  # warm-up
    noise = paired(again, bare, args.repeat)
    pair = paired(ours, bare, args.repeat)
    tiny = make_payload(args.mb / 1024, seed=3)
    extra, small = fixed_cost(
        lambda: execute(one, tiny, directory / "tiny"),
        lambda: torch_save_fsync_replace(tiny, directory / "tiny" / "bare.pt"),
        max(args.repeat, TINY_REPEAT),
    )
    return [
        Row("0", "noise floor (A/A): bare torch.save + fsync + os.replace / the same", noise.ratio, "report",
            noise.detail("bare", "bare", spread=True)),
        Row("1", "single save: `execute` of one `Save` / bare torch.save + fsync + os.replace", pair.ratio,
            "<= 1.05", pair.detail("execute", "bare", spread=True)),
        Row("1b", "same, noise-robust: 1 + fixed cost of `execute` (tiny payload) / bare save",
            1 + extra / statistics.median(pair.second), "<= 1.05",
            f"+{seconds(extra)} per save ({small.detail('execute', 'bare')} for {mib(nbytes(tiny))}, "
            f"{len(small.first)} pairs)"),
    ]


def bench_three_saves(args, payload, directory) -> list[Row]:
    one, three = saves(1), saves(3)
    single = lambda: execute(one, payload, directory / "one")  # noqa: E731
    shared = lambda: execute(three, payload, directory / "three")  # noqa: E731
    separate = lambda: [execute([save], payload, directory / "separate") for save in three]  # noqa: E731
    single(), shared(), separate()  # warm-up
    vs_single = paired(shared, single, args.repeat)
    vs_separate = paired(separate, shared, args.repeat)
    tiny = make_payload(args.mb / 1024, seed=3)
    extra, small = fixed_cost(
        lambda: execute(three, tiny, directory / "three-tiny"),
        lambda: execute(one, tiny, directory / "one-tiny"),
        max(args.repeat, TINY_REPEAT),
    )
    written, calls = bytes_written(shared)
    written_separate, _ = bytes_written(separate)
    size = nbytes(payload)
    return [
        Row("2a", "3 strategies improve in one epoch: `execute` of 3 `Save`s / of 1 `Save`", vs_single.ratio,
            "<= 1.10", vs_single.detail("3 saves", "1 save", spread=True)),
        Row("2b", "same, noise-robust: 1 + extra cost of 2 more names (tiny payload) / 1 `Save`",
            1 + extra / statistics.median(vs_single.second), "<= 1.10",
            f"+{seconds(extra)} per epoch ({small.detail('3 saves', '1 save')} for {mib(nbytes(tiny))}, "
            f"{len(small.first)} pairs)"),
        Row("2c", "3 separate full saves (one callback per metric) / `execute` of 3 `Save`s", vs_separate.ratio,
            ">= 2.5", vs_separate.detail("separate", "shared", spread=True)),
        Row("2d", "bytes written per epoch with 3 improving strategies / payload size", written / size,
            "<= 1.05", f"write_bytes {mib(written)}, wchar {mib(calls)}; 3 separate saves: "
            f"{written_separate / size:.2f} x payload"),
    ]


def bench_async(args, payload, directory) -> list[Row]:
    strategy = [{"metric_name": "val_loss", "filename": "best.pt"}]
    sync = CheckpointManager(directory / "sync", strategy)
    background = CheckpointManager(directory / "async", strategy, async_save=True)
    sync_metrics, async_metrics = Improving(), Improving()
    def update_sync() -> None:
        metrics, epoch = sync_metrics()
        sync.update(metrics, payload, epoch)

    def update_async() -> None:
        metrics, epoch = async_metrics()
        background.update(metrics, payload, epoch)

    update_sync()  # warm-up; the first async save (allocating the staging buffers) is measured:
    first_async = timed(update_async)
    background.wait()
    first_sync = timed(update_sync)
    blocked, synchronous = [], []
    for index in range(args.repeat):
        order = (update_async, update_sync) if index % 2 == 0 else (update_sync, update_async)
        for fn in order:
            elapsed = timed(fn)
            (blocked if fn is update_async else synchronous).append(elapsed)
            background.wait()  # not part of the blocking time
    per_pair = statistics.median(a / s for a, s in zip(blocked, synchronous))

    def ten(update) -> None:
        for _ in range(10):
            update()
        background.wait()

    throughput = paired(lambda: ten(update_async), lambda: ten(update_sync), max(2, (args.repeat + 1) // 2))
    background.close()
    sync.close()
    return [
        Row("3a", "async `update` blocking, first save (allocates staging) / sync `update`", first_async / first_sync,
            "report", f"async {seconds(first_async)}, sync {seconds(first_sync)}"),
        Row("3b", "async `update` blocking, staging buffers exist / sync `update`", per_pair, "<= 0.15",
            f"async {seconds(statistics.median(blocked))}, sync {seconds(statistics.median(synchronous))}"),
        Row("3c", "10 saves back to back incl. final `wait()`: async / sync", throughput.ratio, "<= 1.10",
            throughput.detail("async", "sync", spread=True)),
    ]


def bench_metadata(args, directory) -> list[Row]:
    big_mb, small_mb = 4 * args.mb, args.mb / 16
    one = saves(1)
    log(f"writing a {mib(big_mb * 2**20)} and a {mib(small_mb * 2**20)} checkpoint")
    (big,) = execute(one, make_payload(big_mb, seed=1), directory / "big")
    (small,) = execute(one, make_payload(small_mb, seed=2), directory / "small")
    ckptfn.read_metadata(big), ckptfn.read_metadata(small)  # warm-up

    def metadata_time(path) -> float:
        return statistics.median(timed(lambda: ckptfn.read_metadata(path)) for _ in range(5))

    vs_load, vs_small, loads, metas, smalls = [], [], [], [], []
    for index in range(args.repeat):
        meta_big = metadata_time(big)
        load = timed(lambda: ckptfn.load_checkpoint(big))
        meta_small = metadata_time(small)
        vs_load.append(meta_big / load)
        vs_small.append(meta_big / meta_small)
        loads.append(load), metas.append(meta_big), smalls.append(meta_small)
    return [
        Row("4a", f"`read_metadata` / full `load_checkpoint`, {mib(big.stat().st_size)} file",
            statistics.median(vs_load), "<= 0.02",
            f"read_metadata {seconds(statistics.median(metas))}, load {seconds(statistics.median(loads))}"),
        Row("4b", f"`read_metadata` of {mib(big.stat().st_size)} / of {mib(small.stat().st_size)} file",
            statistics.median(vs_small), "<= 2",
            f"{seconds(statistics.median(metas))} vs {seconds(statistics.median(smalls))}"),
    ]


STRATEGIES = [
    {"metric_name": "val_loss", "mode": "min", "filename": "best_loss.pt", "min_delta": 0.0},
    {"metric_name": "loss_components.concordance", "mode": "min", "filename": "best_concordance.pt", "min_delta": 0.0},
    {"metric_name": "loss_components.mse", "mode": "min", "filename": "best_mse.pt", "min_delta": 0.001},
    {"metric_name": "val_residual_spearman", "mode": "max", "filename": "best_corr.pt", "min_delta": 0.0},
]


def history(epochs: int, seed: int = 0) -> list[dict]:
    """A noisy, mostly improving run; now and then a metric is missing or NaN."""
    rng = random.Random(seed)
    run = []
    for epoch in range(epochs):
        trend = 1.0 / math.sqrt(epoch + 1)
        metrics = {
            "val_loss": trend + rng.gauss(0, 0.05),
            "loss_components": {"concordance": trend / 2 + rng.gauss(0, 0.05), "mse": trend / 3 + rng.gauss(0, 0.02)},
            "val_residual_spearman": 1 - trend + rng.gauss(0, 0.05),
            "lr": 1e-3,
        }
        if rng.random() < 0.01:
            del metrics["loss_components"]
        if rng.random() < 0.01:
            metrics["val_loss"] = math.nan
        run.append(metrics)
    return run


def as_tuples(actions) -> list[tuple]:
    """ckptfn's actions in the plain tracker's tuple form (for the oracle check)."""
    out = []
    for action in actions:
        match action:
            case ckptfn.Save(epoch=epoch, value=value, previous=previous):
                out.append(("save", action.filename, epoch, value, previous))
            case ckptfn.Skip(epoch=epoch, reason=reason):
                out.append(("skip", action.filename, epoch, reason))
    return out


def bench_core(args) -> list[Row]:
    run = history(args.epochs)
    config = ckptfn.Config.from_mapping(STRATEGIES)
    final, ours = ckptfn.scan(ckptfn.init(config), run)
    tracker, theirs = plain_scan(STRATEGIES, run)
    assert [as_tuples(actions) for actions in ours] == theirs, "ckptfn and the plain tracker disagree"
    assert ckptfn.best_values(final) == tracker.best
    steps = run[: min(len(run), 20_000)]

    def attrs_steps() -> None:
        state = ckptfn.init(config)
        for metrics in steps:
            state, _ = ckptfn.step(state, metrics)

    def plain_steps() -> None:
        plain = PlainTracker(STRATEGIES)
        for metrics in steps:
            plain.step(metrics)

    step_pair = paired(attrs_steps, plain_steps, args.repeat)
    scan_pair = paired(lambda: ckptfn.scan(ckptfn.init(config), run), lambda: plain_scan(STRATEGIES, run), args.repeat)
    per_step = lambda times: seconds(statistics.median(times) / len(steps))  # noqa: E731
    saves_count = sum(1 for actions in theirs for action in actions if action[0] == "save")
    return [
        Row("5a", "decision core: `step`, 4 strategies / plain mutable-dict tracker", step_pair.ratio, "<= 3",
            f"{per_step(step_pair.first)} vs {per_step(step_pair.second)} per epoch; same decisions"),
        Row("5b", f"`scan` over {len(run):,} epochs / plain loop", scan_pair.ratio, "<= 3",
            scan_pair.detail("scan", "plain") + f"; {saves_count} saves"),
    ]


def bench_memory(args, payload, directory) -> list[Row]:
    strategy = [{"metric_name": "val_loss", "filename": "best.pt"}]
    size = nbytes(payload)
    sync = CheckpointManager(directory / "rss-sync", strategy)
    improving = Improving()

    def update(manager) -> None:
        metrics, epoch = improving()
        manager.update(metrics, payload, epoch)

    update(sync)  # warm-up
    sync_peaks = [peak_rss_increase(lambda: update(sync)) for _ in range(args.repeat)]
    async_peaks = []
    for index in range(args.repeat):
        with CheckpointManager(directory / f"rss-async-{index}", strategy, async_save=True) as background:
            async_peaks.append(peak_rss_increase(lambda: (update(background), background.wait())))
    return [
        Row("6a", "peak RSS increase during a sync save / payload", max(sync_peaks) / size, "<= 0.10",
            f"worst of {len(sync_peaks)}: {max(sync_peaks) / 2**20:.2f} MiB for {mib(size)}"),
        Row("6b", "peak RSS increase during an async save (fresh staging) / payload", max(async_peaks) / size,
            "<= 1.10", f"worst of {len(async_peaks)}: {max(async_peaks) / 2**20:.2f} MiB for {mib(size)}"),
    ]


class _NullSink:
    """A file that discards what it is given (serialization cost without the disk)."""

    def write(self, data) -> int:
        return len(memoryview(data).cast("B"))

    def flush(self) -> None:
        pass


def bench_crc(args, payload, directory) -> list[Row]:
    one = saves(1)
    raw = lambda: write_raw(payload, directory / "crc" / "raw.bin")  # noqa: E731
    fast = lambda: serialization_context(checksums=False).run(execute, one, payload, directory / "crc")  # noqa: E731
    default = lambda: execute(one, payload, directory / "crc")  # noqa: E731
    (directory / "crc").mkdir()
    raw(), fast(), default()  # warm-up
    vs_fast = paired(raw, fast, args.repeat)
    vs_default = paired(raw, default, args.repeat)
    tiny = make_payload(args.mb / 1024, seed=3)
    (directory / "crc-tiny").mkdir()
    extra, small = fixed_cost(
        lambda: serialization_context(checksums=False).run(execute, one, tiny, directory / "crc-tiny"),
        lambda: write_raw(tiny, directory / "crc-tiny" / "raw.bin"),
        max(args.repeat, TINY_REPEAT),
    )
    raw_time = statistics.median(vs_fast.first)
    without = lambda: serialization_context(checksums=False).run(torch.save, payload, _NullSink())  # noqa: E731
    with_crc = lambda: torch.save(payload, _NullSink())  # noqa: E731
    cpu = paired(without, with_crc, args.repeat)
    return [
        Row("7a", "fast path (`checksums=False`): raw write + fsync / ckptfn save, same bytes", vs_fast.ratio,
            ">= 0.9", vs_fast.detail("raw", "ckptfn", spread=True)),
        Row("7b", "same, noise-robust: raw / (raw + fixed cost of the fast path, tiny payload)",
            raw_time / (raw_time + extra), ">= 0.9",
            f"+{seconds(extra)} per save ({small.detail('ckptfn', 'raw')} for {mib(nbytes(tiny))}, "
            f"{len(small.first)} pairs)"),
        Row("7c", "default (CRC32 on): raw write + fsync / ckptfn save", vs_default.ratio, "report",
            vs_default.detail("raw", "ckptfn", spread=True)),
        Row("7d", "torch.save to a null sink: without CRC32 / with CRC32", cpu.ratio, "report",
            cpu.detail("without", "with")),
    ]


def bench_verify(args, directory) -> list[Row]:
    """A full verify reads every byte and hashes it: against reading the file alone, from the page cache."""
    (path,) = execute(saves(1), make_payload(4 * args.mb, seed=4), directory / "verify")
    size = path.stat().st_size
    full = lambda: verify_checkpoint(path, level="full")  # noqa: E731
    cat = lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # noqa: E731
    assert full().ok  # warm-up: both sides read from the page cache
    cat()
    pair = paired(full, cat, args.repeat)
    peak = max(peak_rss_increase(full) for _ in range(3))
    return [
        Row("8a", f"`verify_checkpoint(level=\"full\")` of a {mib(size)} file / `cat` of it > /dev/null", pair.ratio,
            "<= 1.3", pair.detail("verify", "cat", spread=True) + f"; CRC32 by {CRC32_IMPLEMENTATION}"),
        Row("8b", "peak RSS increase during a full verify / file size", peak / size, "report",
            f"worst of 3: {peak / 2**20:.2f} MiB for {mib(size)}"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256.0, help="payload size in MiB (default 256)")
    parser.add_argument("--repeat", type=int, default=7, help="repetitions per measurement (default 7)")
    parser.add_argument("--epochs", type=int, default=100_000, help="epochs for scan (default 100000)")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp directory)")
    parser.add_argument("--only", default=",".join(IDS), help="comma-separated row groups, e.g. 1,3")
    parser.add_argument("--write-readme", nargs="?", const="benchmark", metavar="REGION",
                        help="also write the table into this region of README.md (default: benchmark)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    torch.manual_seed(0)
    directory = pathlib.Path(tempfile.mkdtemp(prefix="ckptfn-bench-", dir=args.dir))
    fs_type = filesystem_of(str(directory))
    rows: list[Row] = []
    try:
        payload = make_payload(args.mb)
        groups = [
            ("1", lambda: bench_single_save(args, payload, directory)),
            ("2", lambda: bench_three_saves(args, payload, directory)),
            ("3", lambda: bench_async(args, payload, directory)),
            ("4", lambda: bench_metadata(args, directory)),
            ("5", lambda: bench_core(args)),
            ("6", lambda: bench_memory(args, payload, directory)),
            ("7", lambda: bench_crc(args, payload, directory)),
            ("8", lambda: bench_verify(args, directory)),
        ]
        for group, bench in groups:
            if group in only:
                log(f"row {group} ...")
                rows += bench()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    header = (
        f"ckptfn {ckptfn.__version__} benchmarks: payload {mib(nbytes(payload))} in {TENSORS} float32 tensors, "
        f"median of {args.repeat} paired repetitions; torch {torch.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs; files in {fs_type} ({directory.parent})"
    )
    print(header)
    if fs_type in ("tmpfs", "ramfs"):
        print(f"warning: {directory.parent} is a {fs_type}, not a disk: pass --dir on a real disk")
    print()
    print(render(rows))
    if args.write_readme:
        from tests.readme_regions import measured_note, write_region

        command = " ".join(["python tests/benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
        write_region(args.write_readme, measured_note(command, header) + "\n\n" + render(rows))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
