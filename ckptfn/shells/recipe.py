"""The write recipe every shell follows, in the effectful pieces the core cannot hold.

A shell's step, whatever the training loop around it::

    new, actions = step(old, metrics, epoch)            # pure
    saves, skips = partition(actions)                   # pure
    snapshot = plan(saves, state=new, metrics=metrics)  # pure, given the clock read here
    written = write(directory, snapshot, payload)       # the one write function
    kept = state_to_keep(config, directory, old, new, written)  # the pure commit rule
    written.raise_error()

``plan`` reads the clock and the library versions; ``state_to_keep`` reads the
files only when the commit rule needs them (a write that failed after
publishing). ``report_skips`` says once per strategy and reason that a metric was
missing or not finite.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

from ckptfn.core.actions import Enter, Periodic, Save, Skip
from ckptfn.core.commit import commit
from ckptfn.core.events import saved_events
from ckptfn.core.naming import dcp_name
from ckptfn.core.errors import MetricWarning
from ckptfn.core.summary import skip_line
from ckptfn.core.snapshot import Snapshot, plan_snapshot
from ckptfn.core.state import State
from ckptfn.core.step import new_skips
from ckptfn.io.objectstore import is_remote, store_for
from ckptfn.io.read import restore_from_directory
from ckptfn.io.write import Written, versions

__all__ = [
    "hooks_of", "notify", "plan", "report_skips", "size_on_disk", "state_to_keep", "trackers_of", "user_stacklevel", "utc_now",
]

logger = logging.getLogger("ckptfn")


def utc_now() -> dt.datetime:
    """The wall clock, in UTC (the only clock the library reads).

    >>> now = utc_now()
    >>> now.tzinfo, now.utcoffset()
    (datetime.timezone.utc, datetime.timedelta(0))
    """
    return dt.datetime.now(dt.timezone.utc)


def plan(
    saves: Sequence[Save | Periodic],
    *,
    state: State | None = None,
    metrics: Mapping | None = None,
    now: dt.datetime | None = None,
    extra: Mapping | None = None,
) -> Snapshot:
    """``ckptfn.core.snapshot.plan_snapshot`` with the clock (unless ``now`` is given) and
    this process's library versions.

    >>> import datetime as dt, ckptfn
    >>> from ckptfn.kit import partition
    >>> state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("val_loss")), {"val_loss": 0.5}, epoch=0)
    >>> snapshot = plan(partition(actions)[0], state=state, metrics={"val_loss": 0.5},
    ...                 now=dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc))
    >>> snapshot.filenames, snapshot.metadata["timestamp"], sorted(snapshot.metadata["versions"])
    (('best_val_loss.pt',), '2024-01-02T00:00:00.000000+00:00', ['ckptfn', 'torch'])
    """
    return plan_snapshot(
        saves, now=utc_now() if now is None else now, versions=versions(), state=state, metrics=metrics, extra=extra
    )


def state_to_keep(
    config: object, directory: str | os.PathLike, old: State, new: State, written: Written
) -> State:
    """The commit rule (``ckptfn.core.commit.commit``) for ``written``, reading the files in
    ``directory`` only when the write failed after publishing something.

    >>> import tempfile, torch, ckptfn
    >>> from ckptfn.kit import Outcome, partition, write
    >>> old = ckptfn.init(ckptfn.Strategy("val_loss"))
    >>> new, actions = ckptfn.step(old, {"val_loss": 0.5}, epoch=0)
    >>> snapshot = plan(partition(actions)[0], state=new)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     written = write(directory, snapshot, {"w": torch.zeros(2)})
    ...     state_to_keep(old.config, directory, old, new, written) == new  # saved: the new state
    ...     failed = Written([], Outcome.failure(snapshot.filenames), OSError("disk full"))
    ...     state_to_keep(old.config, directory, old, new, failed) == old  # nothing published: retry
    True
    True
    """
    if not written.outcome.touched_disk:
        return commit(old, new, written.outcome)
    # the write's own error is the one to raise; an odd file met while reading back only warns
    on_disk = restore_from_directory(config, directory, unreadable="warn")
    return commit(old, new, written.outcome, on_disk)


def user_stacklevel(skip: tuple[str, ...] = ()) -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` called by the caller of this function) of the
    first frame outside ckptfn and the packages named in ``skip`` (e.g. ``lightning``, ``torch``):
    the user's code, however deep a framework calls back into ckptfn.

    >>> user_stacklevel() >= 1
    True
    """
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    for name in skip:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            roots.append(os.path.dirname(os.path.abspath(module.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not any(filename.startswith(root + os.sep) for root in roots):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def hooks_of(on_saved: object) -> tuple[Callable, ...]:
    """``on_saved`` (None, one callable, or a sequence of them) as a tuple of hooks.

    >>> hooks_of(None), len(hooks_of(print)), len(hooks_of([print, repr]))
    ((), 1, 2)
    """
    if on_saved is None:
        return ()
    if callable(on_saved):
        return (on_saved,)
    if isinstance(on_saved, Iterable) and not isinstance(on_saved, (str, bytes)):
        hooks = tuple(on_saved)
        for index, hook in enumerate(hooks):
            if not callable(hook):
                raise TypeError(f"on_saved[{index}]: expected a callable, got {type(hook).__name__} {hook!r}")
        return hooks
    raise TypeError(f"on_saved: expected a callable or a list of callables, got {type(on_saved).__name__} {on_saved!r}")


def trackers_of(config: object) -> tuple[Callable, ...]:
    """The ``on_saved`` hooks of the trackers a config names (``Config.trackers``), built by
    ``ckptfn.integrations.trackers.tracker`` (imported only when a config names one)."""
    names = getattr(config, "trackers", ())
    if not names:
        return ()
    from ckptfn.integrations.trackers import tracker

    return tuple(tracker(name) for name in names)


def size_on_disk(path: str | os.PathLike) -> int:
    """The bytes of a checkpoint file, or of the regular files of a sharded checkpoint tree; for a
    URL (``s3://...``), the object's size (``FileNotFoundError`` when there is none).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     _ = pathlib.Path(directory, "a.pt").write_bytes(bytes(12))
    ...     size_on_disk(f"{directory}/a.pt")
    12
    """
    if is_remote(path):
        try:
            store, key = store_for(path)
            size = store.size(key)
        except OSError:
            raise
        except Exception as error:  # noqa: BLE001 - the store's own errors (network, credentials) as OSError
            raise OSError(f"{path}: {type(error).__name__}: {error}") from error
        if size is None:
            raise FileNotFoundError(f"{path}: no such object")
        return size
    path = pathlib.Path(path)
    if not path.is_dir():
        return path.stat().st_size
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file() and not entry.is_symlink())


def notify(hooks: Sequence[Callable], saves: Sequence[Save | Enter | Periodic], paths: Sequence[pathlib.Path]) -> None:
    """Give each hook every ``Saved`` event of a committed snapshot (``ckptfn.core.events``).

    A hook that raises is a WARNING on the ``ckptfn`` logger, never an error: the files
    are committed, and a tracker that is down must not stop training.

    >>> import tempfile, torch, ckptfn
    >>> from ckptfn.kit import partition, write
    >>> state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("val_loss")), {"val_loss": 0.5}, epoch=0, global_step=80)
    >>> saves, _ = partition(actions)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     written = write(directory, plan(saves, state=state), {"w": torch.zeros(2)})
    ...     events = []
    ...     notify([events.append], saves, written.paths)
    >>> [(e.name, e.kind, e.value, e.global_step, e.bytes > 0) for e in events]
    [('best_val_loss.pt', 'best', 0.5, 80, True)]
    """
    if not hooks or not saves:
        return
    located = {path.name: str(path) for path in paths}
    where = {save.filename: located.get(save.filename) or located.get(dcp_name(save.filename)) for save in saves}
    if any(path is None for path in where.values()):
        return  # not this write's names (nothing was committed under them)
    try:
        size = size_on_disk(next(iter(where.values())))
    except OSError:
        size = 0
    for event in saved_events(saves, where, size):
        for hook in hooks:
            try:
                hook(event)
            except Exception as error:  # noqa: BLE001 - reported, never raised: the snapshot is committed
                logger.warning("the on_saved hook %r failed for %s: %s: %s", hook, event.name, type(error).__name__, error)


def report_skips(
    seen: frozenset[tuple[str, str]], actions: Iterable[object], *, stacklevel: int = 2, loud: bool = True
) -> frozenset[tuple[str, str]]:
    """Warn (``MetricWarning``) about the first skip of each strategy and reason, log the
    repeats at DEBUG; the grown ``seen`` set. ``loud=False`` (a rank other than 0) says nothing.
    ``stacklevel`` counts from the caller of ``report_skips`` (``user_stacklevel`` finds one).

    >>> import warnings, ckptfn
    >>> state = ckptfn.init(ckptfn.Strategy("val_loss", on_missing="warn"))
    >>> _, actions = ckptfn.step(state, {"train_loss": 0.3, "val_los": 0.2}, epoch=0)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     seen = report_skips(frozenset(), actions)
    ...     seen = report_skips(seen, actions)  # the same skip again: DEBUG only
    >>> [(w.category.__name__, str(w.message)) for w in caught]
    [('MetricWarning', "val_loss is missing at epoch 0; best_val_loss.pt not saved; the metrics are: train_loss, val_los (did you mean 'val_los'?) (further such epochs are logged at DEBUG)")]
    >>> len(seen)
    1
    """
    seen, first, repeats = new_skips(seen, (action for action in actions if isinstance(action, Skip)))
    if loud:
        for skip in first:
            warnings.warn(
                f"{skip_line(skip)} (further such epochs are logged at DEBUG)", MetricWarning, stacklevel=stacklevel + 1
            )
        for skip in repeats:
            logger.debug("%s", skip)
    return seen
