"""``execute``: perform one step's actions in one call (the simplest shell)."""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import warnings
from collections.abc import Iterable, Mapping

from ckptfn.core.actions import Periodic, Save, Skip
from ckptfn.core.summary import skip_line
from ckptfn.core.errors import MetricWarning
from ckptfn.core.snapshot import partition
from ckptfn.core.state import State
from ckptfn.io.write import write
from ckptfn.shells.recipe import plan

__all__ = ["execute"]


def execute(
    actions: Iterable[Save | Periodic | Skip],
    payload: object,
    directory: str | os.PathLike,
    *,
    state: State | None = None,
    metrics: Mapping | None = None,
    now: dt.datetime | None = None,
) -> tuple[pathlib.Path, ...]:
    """Perform the ``Save`` and ``Periodic`` actions of one ``step``: one write, one name per save.

    ``Skip`` actions write nothing and each gives a ``MetricWarning``. Returns the
    final paths written, in action order. ``state`` (the new ``State``) is stored
    so training can resume; ``metrics`` (this epoch's) are stored as floats;
    ``now`` (timezone-aware) replaces the clock. Raises ``PayloadError`` (nothing
    written) or ``CheckpointWriteError``.

    >>> import tempfile, torch, ckptfn
    >>> state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("val_loss")), {"val_loss": 0.5}, epoch=0)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     [p.name for p in execute(actions, {"w": torch.zeros(2)}, directory, state=state)]
    ['best_val_loss.pt']
    """
    saves, skips = partition(actions)
    for skip in skips:
        warnings.warn(skip_line(skip), MetricWarning, stacklevel=2)
    if not saves:
        return ()
    written = write(directory, plan(saves, state=state, metrics=metrics, now=now), payload)
    written.raise_error()
    return written.paths
