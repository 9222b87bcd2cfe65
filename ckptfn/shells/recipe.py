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
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence

from ckptfn.core.actions import Periodic, Save, Skip
from ckptfn.core.commit import commit
from ckptfn.core.errors import MetricWarning
from ckptfn.core.summary import skip_line
from ckptfn.core.snapshot import Snapshot, plan_snapshot
from ckptfn.core.state import State
from ckptfn.core.step import new_skips
from ckptfn.io.read import restore_from_directory
from ckptfn.io.write import Written, versions

__all__ = ["plan", "report_skips", "state_to_keep", "user_stacklevel", "utc_now"]

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
