"""Retention: which archived versions to delete so that at most ``keep`` versions remain.

Pure. The archived versions of ``best_corr.pt`` are the names
``best_corr_<UTC stamp>[-n].pt`` (see ``ckptfn.core.naming``). A stamp is the save
time of its version in a fixed-width form, so names sort chronologically; a
``-n`` counter (a name clash) sorts after the plain name of the same stamp.

The executor calls ``plan_prune`` with the directory listing *after* the new
version is committed, and deletes exactly what it returns: never the current
file, only the oldest archived versions.

The order is the order of saves, not of the wall clock: the version archived now
is always the newest, so its name's stamp is its save time or, if the clock went
backwards since (NTP, a restored VM), just after the newest archived stamp
(``archive_moment``). The timestamp recorded inside the file stays the true one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from ckptfn.core.naming import archived_of, member_of, split_suffix, stamp_moment

__all__ = ["archive_moment", "archived_versions", "plan_member_prune", "plan_prune", "plan_removals", "version_order"]

_TICK = dt.timedelta(microseconds=1)


def version_order(name: str, filename: str) -> tuple[str, int] | None:
    """The sort key ``(stamp, counter)`` of ``name`` as an archived version of ``filename``, else None.

    >>> version_order("best_corr_20261129T131500123456Z-2.pt", "best_corr.pt")
    ('20261129T131500123456Z', 2)
    >>> version_order("best_corr.pt", "best_corr.pt") is None
    True
    """
    if not archived_of(name, filename):
        return None
    stem, suffix = split_suffix(filename)
    stamp, _, counter = name[len(stem) + 1 : len(name) - len(suffix)].partition("-")
    return stamp, int(counter) if counter else 0


def archived_versions(filename: str, names: Iterable[str]) -> tuple[str, ...]:
    """The archived versions of ``filename`` among ``names``, oldest first.

    >>> archived_versions("a.pt", ["a.pt", "a_20260102T000000000000Z.pt", "b.pt", "a_20260101T000000000000Z.pt"])
    ('a_20260101T000000000000Z.pt', 'a_20260102T000000000000Z.pt')
    """
    keyed = ((version_order(name, filename), name) for name in set(names))
    return tuple(name for key, name in sorted((k, n) for k, n in keyed if k is not None))


def plan_prune(filename: str, keep: int | None, names: Iterable[str]) -> tuple[str, ...]:
    """The names to delete so that ``filename`` has at most ``keep`` versions: itself plus
    the ``keep - 1`` newest archived ones. Oldest first; ``keep=None`` deletes nothing.

    >>> names = ["best.pt", "best_20260101T000000000000Z.pt", "best_20260103T000000000000Z.pt",
    ...          "best_20260102T000000000000Z.pt", "best_20260102T000000000000Z-1.pt", "other.pt"]
    >>> plan_prune("best.pt", 3, names)
    ('best_20260101T000000000000Z.pt', 'best_20260102T000000000000Z.pt')
    >>> plan_prune("best.pt", None, names), plan_prune("best.pt", 9, names)
    ((), ())
    """
    if keep is None:
        return ()
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")
    versions = archived_versions(filename, names)
    return versions[: max(len(versions) - (keep - 1), 0)]


def plan_member_prune(filename: str, kept: Iterable[str], names: Iterable[str]) -> tuple[str, ...]:
    """The top-k members of ``filename`` among ``names`` that are not ``kept``, sorted: those
    that left the top k, and traces of a move or a deletion a crash interrupted.

    >>> names = ["best.pt", "best-epoch=1.pt", "best-epoch=4.pt", "best-epoch=2-1.pt", "best_20260101T000000000000Z.pt"]
    >>> plan_member_prune("best.pt", ["best-epoch=4.pt"], names)
    ('best-epoch=1.pt', 'best-epoch=2-1.pt')
    """
    stays = frozenset(kept)
    return tuple(sorted(name for name in set(names) if member_of(name, filename) and name not in stays))


def plan_removals(
    kept_versions: Iterable[tuple[str, int | None]],
    families: Iterable[tuple[str, Iterable[str]]],
    removes: Iterable[str],
    names: Iterable[str],
) -> list[tuple[str, str]]:
    """``(name, why)`` of everything to delete among ``names`` once a snapshot is committed: the
    archived versions beyond each ``(filename, keep)``, the members of each top-k ``(filename,
    kept members)`` family that are not kept, and the listed ``removes`` (members that left).

    >>> names = ["a.pt", "a_20260101T000000000000Z.pt", "a_20260102T000000000000Z.pt", "b.pt", "b-epoch=1.pt", "b-epoch=2.pt"]
    >>> plan_removals([("a.pt", 2)], [("b.pt", ["b-epoch=2.pt"])], ["b-epoch=1.pt"], names)
    [('a_20260101T000000000000Z.pt', 'a.pt keeps 2 versions'), ('b-epoch=1.pt', 'it left the top k of b.pt')]
    """
    names = list(names)
    doomed = [(n, f"{f} keeps {keep} versions") for f, keep in kept_versions for n in plan_prune(f, keep, names)]
    for filename, kept in families:
        doomed += [(n, f"it left the top k of {filename}") for n in plan_member_prune(filename, kept, names)]
    listed, chosen = set(names), {n for n, _ in doomed}
    doomed += [(n, "it left the top k") for n in removes if n in listed and n not in chosen]
    return doomed


def archive_moment(filename: str, saved_at: dt.datetime, names: Iterable[str]) -> dt.datetime:
    """The moment to name the version of ``filename`` being archived now: its save time, or
    one microsecond after the newest archived version among ``names`` if that is later.

    >>> import datetime as dt
    >>> utc = dt.timezone.utc
    >>> names = ["best.pt", "best_20260103T000000000000Z.pt"]
    >>> archive_moment("best.pt", dt.datetime(2026, 1, 5, tzinfo=utc), names).day  # the clock moved on
    5
    >>> archive_moment("best.pt", dt.datetime(2026, 1, 2, tzinfo=utc), names)  # it went backwards
    datetime.datetime(2026, 1, 3, 0, 0, 0, 1, tzinfo=datetime.timezone.utc)
    """
    versions = archived_versions(filename, names)
    if not versions:
        return saved_at
    newest = stamp_moment(version_order(versions[-1], filename)[0])
    if saved_at > newest:
        return saved_at
    try:
        return newest + _TICK
    except OverflowError:  # the newest stamp is the last representable moment: the clash counter orders them
        return newest
