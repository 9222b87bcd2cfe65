"""Measuring side by side: paired timings, peak RSS, bytes written, and the result table.

Every ratio compares two things timed alternately in the same run (A B, then B A,
...), so slow phases of a noisy machine hit both sides; the reported ratio is the
median over repetitions of the per-pair ratio.

>>> Row("1", "a vs b", 1.02, "<= 1.05").met, Row("2", "a vs b", 2.4, ">= 2.5").met, Row("3", "x", 0.5).met
('yes', 'no', '-')
>>> print(render([Row("1", "a vs b", 1.02, "<= 1.05", "1.0 s vs 0.98 s")]))
| # | measurement | ratio | target | met | detail |
|---|---|---|---|---|---|
| 1 | a vs b | 1.020 | <= 1.05 | yes | 1.0 s vs 0.98 s |
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

COLUMNS = ("#", "measurement", "ratio", "target", "met", "detail")


@dataclass(frozen=True)
class Row:
    """One line of the table: ``ratio`` against an optional ``target`` such as ``"<= 1.05"``."""

    id: str
    measurement: str
    ratio: float
    target: str = "report"
    detail: str = ""

    @property
    def met(self) -> str:
        if self.target == "report":
            return "-"
        op, bound = self.target.split()
        shown = round(self.ratio, 3)  # judged as printed, so the table never contradicts itself
        return "yes" if (shown <= float(bound) if op == "<=" else shown >= float(bound)) else "no"


def render(rows: Sequence[Row]) -> str:
    """The rows as one Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = (row.id, row.measurement, f"{row.ratio:.3f}", row.target, row.met, row.detail)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Pair:
    """Timings of two sides measured alternately."""

    first: tuple[float, ...]
    second: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """Median of the per-repetition ratios first / second."""
        return statistics.median(a / b for a, b in zip(self.first, self.second))

    @property
    def inverse(self) -> float:
        """Median of the per-repetition ratios second / first."""
        return statistics.median(b / a for a, b in zip(self.first, self.second))

    def detail(self, first: str, second: str, *, spread: bool = False) -> str:
        """The two medians; with ``spread``, also the lowest and highest per-repetition ratio."""
        text = f"{first} {seconds(statistics.median(self.first))}, {second} {seconds(statistics.median(self.second))}"
        if spread:
            ratios = [a / b for a, b in zip(self.first, self.second)]
            text += f"; pairs {min(ratios):.2f}-{max(ratios):.2f}"
        return text


def paired(first: Callable[[], object], second: Callable[[], object], repeat: int) -> Pair:
    """Time ``first`` and ``second`` ``repeat`` times each, alternating which goes first."""
    a, b = [], []
    for index in range(repeat):
        if index % 2 == 0:
            a.append(timed(first))
            b.append(timed(second))
        else:
            b.append(timed(second))
            a.append(timed(first))
    return Pair(tuple(a), tuple(b))


def seconds(value: float) -> str:
    """A duration for the detail column.

    >>> seconds(1.5), seconds(0.0123), seconds(0.0000042)
    ('1.50 s', '12.3 ms', '4.2 us')
    """
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.1f} us"


def mib(nbytes: float) -> str:
    """A size for the detail column.

    >>> mib(256 * 2**20), mib(16 * 2**10)
    ('256.0 MiB', '16 KiB')
    """
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


# --- memory and I/O (Linux /proc) ------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_increase(fn: Callable[[], object]) -> int:
    """Bytes by which the resident set's peak during ``fn()`` exceeds the RSS before it.

    Resets the kernel's high-water mark first (``/proc/self/clear_refs``, value 5).
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def io_counters() -> dict[str, int]:
    """``/proc/self/io``: ``wchar`` (bytes passed to write calls), ``write_bytes`` (sent to storage), ..."""
    with open("/proc/self/io") as io:
        return {key: int(value) for key, value in (line.split(": ") for line in io.read().splitlines())}


def bytes_written(fn: Callable[[], object]) -> tuple[int, int]:
    """``(write_bytes, wchar)`` caused by ``fn()``."""
    before = io_counters()
    fn()
    after = io_counters()
    return after["write_bytes"] - before["write_bytes"], after["wchar"] - before["wchar"]


def filesystem_of(path: str) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts), or "unknown"."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _, point, fstype, *_ = line.split()
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best, kind = point, fstype
    except OSError:
        pass
    return kind
