"""File names of the checkpoint directory: archives and temporary files.

Pure string functions; the clock, pid and host name are passed in.

- An archived version of ``best_corr.pt`` is ``best_corr_<UTC timestamp>.pt``,
  e.g. ``best_corr_20261129T131500123456Z.pt``; on a clash ``-1``, ``-2``, ... is
  appended to the stem.
- A temporary entry (a file, or a directory tree of a sharded checkpoint) is
  hidden and names its writer: ``.ckptfn.<pid>.<host>.<token>.<final name>.<kind>``,
  where ``kind`` is ``tmp`` (being written) or ``old`` (a tree moved aside while
  its name is replaced where the file system cannot exchange two names). One
  grammar for both kinds of entry, so one sweep tidies after dead writers.
- The sharded checkpoint of ``best_loss.pt`` is the directory ``best_loss.dcp``.
- A top-k member of ``best_loss.pt`` other than the best is named by the position it
  was saved at: ``best_loss-epoch=3-step=120.pt`` (``-step=`` only when the global
  step is known; ``-1``, ``-2``, ... on a clash).
"""

from __future__ import annotations

import datetime as dt
import re

__all__ = [
    "DCP_SUFFIX",
    "TEMP_KINDS",
    "archive_name",
    "archive_stamp",
    "stamp_moment",
    "archived_of",
    "dcp_name",
    "host_tag",
    "member_name",
    "member_of",
    "parse_temp_name",
    "split_suffix",
    "temp_name",
    "timestamp_iso",
]

_STAMP = re.compile(r"\d{8}T\d{12}Z")
_TEMP = re.compile(
    r"^\.ckptfn\.(?P<pid>\d+)(?:n(?P<ns>\d+))?\.(?P<host>[A-Za-z0-9_-]+)\.(?P<token>[0-9a-f]+)"
    r"\.(?P<name>.+)\.(?P<kind>tmp|old)$"
)
_MEMBER = re.compile(r"-epoch=(?P<epoch>\d+)(?:-step=(?P<step>\d+))?(?:-(?P<clash>[1-9]\d*))?")
DCP_SUFFIX = ".dcp"
TEMP_KINDS = ("tmp", "old")


def _utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"now: expected a timezone-aware datetime, got naive {moment!r}")
    return moment.astimezone(dt.timezone.utc)


def timestamp_iso(moment: dt.datetime) -> str:
    """ISO-8601 UTC with microseconds, as stored in metadata.

    >>> timestamp_iso(dt.datetime(2026, 11, 29, 14, 15, tzinfo=dt.timezone(dt.timedelta(hours=1))))
    '2026-11-29T13:15:00.000000+00:00'
    """
    return _utc(moment).isoformat(timespec="microseconds")


def archive_stamp(moment: dt.datetime) -> str:
    """The compact UTC stamp used in archive names.

    >>> archive_stamp(dt.datetime(2026, 11, 29, 13, 15, 0, 123456, tzinfo=dt.timezone.utc))
    '20261129T131500123456Z'
    """
    t = _utc(moment)  # formatted by hand: strftime's %Y does not pad years before 1000
    return f"{t.year:04d}{t.month:02d}{t.day:02d}T{t.hour:02d}{t.minute:02d}{t.second:02d}{t.microsecond:06d}Z"


def stamp_moment(stamp: str) -> dt.datetime:
    """The UTC moment an ``archive_stamp`` stands for.

    >>> stamp_moment("20261129T131500123456Z")
    datetime.datetime(2026, 11, 29, 13, 15, 0, 123456, tzinfo=datetime.timezone.utc)
    """
    if not _STAMP.fullmatch(stamp):
        raise ValueError(f"not an archive stamp: {stamp!r}")
    return dt.datetime(
        int(stamp[0:4]), int(stamp[4:6]), int(stamp[6:8]), int(stamp[9:11]), int(stamp[11:13]),
        int(stamp[13:15]), int(stamp[15:21]), tzinfo=dt.timezone.utc,
    )


def split_suffix(filename: str) -> tuple[str, str]:
    """``("best_corr", ".pt")``; a name without a dot has an empty suffix.

    >>> split_suffix("best_corr.pt"), split_suffix("last"), split_suffix("model.tar.gz")
    (('best_corr', '.pt'), ('last', ''), ('model.tar', '.gz'))
    """
    stem, dot, suffix = filename.rpartition(".")
    return (stem, dot + suffix) if dot and stem else (filename, "")


def archive_name(filename: str, moment: dt.datetime, clash: int = 0) -> str:
    """Where the version of ``filename`` saved at ``moment`` is kept; ``clash`` > 0 adds ``-clash``.

    >>> when = dt.datetime(2026, 11, 29, 13, 15, 0, 123456, tzinfo=dt.timezone.utc)
    >>> archive_name("best_corr.pt", when), archive_name("best_corr.pt", when, 2)
    ('best_corr_20261129T131500123456Z.pt', 'best_corr_20261129T131500123456Z-2.pt')
    """
    stem, suffix = split_suffix(filename)
    counter = f"-{clash}" if clash else ""
    return f"{stem}_{archive_stamp(moment)}{counter}{suffix}"


def archived_of(name: str, filename: str) -> bool:
    """Whether ``name`` is an archived version of ``filename``.

    >>> archived_of("best_corr_20261129T131500123456Z-1.pt", "best_corr.pt"), archived_of("best_corr.pt", "best_corr.pt")
    (True, False)
    """
    stem, suffix = split_suffix(filename)
    if not (name.startswith(stem + "_") and name.endswith(suffix)):
        return False
    middle = name[len(stem) + 1 : len(name) - len(suffix)]
    stamp, _, counter = middle.partition("-")
    return bool(_STAMP.fullmatch(stamp)) and (not counter or counter.isdigit())


def host_tag(host: str) -> str:
    """The form of a host name used inside temporary names (dots and odd characters become ``_``).

    >>> host_tag("gpu01.cluster")
    'gpu01_cluster'
    """
    return re.sub(r"[^A-Za-z0-9_-]", "_", host)[:32] or "host"


def temp_name(
    filename: str, pid: int, host: str, token: str, kind: str = "tmp", namespace: int | None = None
) -> str:
    """The hidden name a writer uses while producing ``filename`` (``kind="tmp"``), or for
    the old tree it moved aside from ``filename`` (``kind="old"``). ``namespace`` (the
    writer's PID-namespace id) says in which namespace ``pid`` means that process.

    >>> temp_name("best_loss.pt", 4242, "node-1.example", "9f3a")
    '.ckptfn.4242.node-1_example.9f3a.best_loss.pt.tmp'
    >>> temp_name("best_loss.dcp", 7, "h", "ab", "old", namespace=4026531836)
    '.ckptfn.7n4026531836.h.ab.best_loss.dcp.old'
    """
    if kind not in TEMP_KINDS:
        raise ValueError(f"kind must be one of {TEMP_KINDS}, got {kind!r}")
    writer = f"{pid}" if namespace is None else f"{pid}n{namespace}"
    return f".ckptfn.{writer}.{host_tag(host)}.{token}.{filename}.{kind}"


def parse_temp_name(name: str) -> tuple[int, str, str, str, int | None] | None:
    """``(pid, host tag, final name, kind, PID namespace or None)`` of a ckptfn temporary name, else None.

    >>> parse_temp_name(temp_name("best_loss.pt", 4242, "node-1", "9f3a"))
    (4242, 'node-1', 'best_loss.pt', 'tmp', None)
    >>> parse_temp_name(temp_name("best_loss.pt", 1, "node-1", "9f3a", namespace=5))[4]
    5
    >>> parse_temp_name("best_loss.pt") is None
    True
    """
    match = _TEMP.match(name)
    if not match:
        return None
    namespace = int(match["ns"]) if match["ns"] is not None else None
    return int(match["pid"]), match["host"], match["name"], match["kind"], namespace


def dcp_name(filename: str) -> str:
    """The directory holding the sharded checkpoint of a strategy's ``filename``.

    >>> dcp_name("best_loss.pt"), dcp_name("last"), dcp_name("best_loss.dcp")
    ('best_loss.dcp', 'last.dcp', 'best_loss.dcp')
    """
    return split_suffix(filename)[0] + DCP_SUFFIX


def member_name(filename: str, epoch: int, global_step: int | None = None, clash: int = 0) -> str:
    """The name of a top-k member of ``filename`` saved at ``epoch`` (and ``global_step``).

    >>> member_name("best_loss.pt", 3), member_name("best_loss.pt", 3, 120), member_name("best_loss.pt", 3, clash=1)
    ('best_loss-epoch=3.pt', 'best_loss-epoch=3-step=120.pt', 'best_loss-epoch=3-1.pt')
    """
    stem, suffix = split_suffix(filename)
    step = "" if global_step is None else f"-step={global_step}"
    counter = f"-{clash}" if clash else ""
    return f"{stem}-epoch={epoch}{step}{counter}{suffix}"


def member_of(name: str, filename: str) -> bool:
    """Whether ``name`` has the form of a top-k member of ``filename`` (``member_name``).

    >>> member_of("best_loss-epoch=3-step=120.pt", "best_loss.pt"), member_of("best_loss.pt", "best_loss.pt")
    (True, False)
    >>> member_of("best_loss-epoch=3.pt", "best_loss.pth"), member_of("best_loss-epoch=x.pt", "best_loss.pt")
    (False, False)
    """
    stem, suffix = split_suffix(filename)
    if not (name.startswith(stem) and name.endswith(suffix)) or len(name) <= len(stem) + len(suffix):
        return False
    return _MEMBER.fullmatch(name[len(stem) : len(name) - len(suffix)]) is not None
