"""Periodic saves: the ``Every`` record and the rule that says when it is due.

Pure. ``Every(n_epochs=1, filename="last.pt")`` saves a snapshot every n epochs,
whatever the metrics, so training can always resume from its latest state. It
sits in ``Config.strategies`` beside the metric strategies; when a best and a
periodic save fall on the same epoch they share one write (hard links).

In plain data (YAML, ``Config.from_mapping``) it is a strategy mapping with the
key ``every_n_epochs`` instead of ``metric_name``.
"""

from __future__ import annotations

import numbers

import attrs

from ckptfn.core.errors import ConfigError
from ckptfn.core.strategy import check_bool, check_filename, check_keep, to_keep

__all__ = ["EVERY_KEYS", "LAST_FILENAME", "Every", "due"]

LAST_FILENAME = "last.pt"
#: The keys of an ``Every`` in plain data; ``every_n_epochs`` is its ``n_epochs``.
EVERY_KEYS = ("every_n_epochs", "filename", "overwrite", "keep")


def _to_count(value: object) -> object:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _check_n_epochs(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"expected an int >= 1, got {type(value).__name__} {value!r}", attribute.name)


@attrs.frozen
class Every:
    """Save every ``n_epochs`` epochs regardless of the metrics.

    Args:
        n_epochs: the period; with 0-based epochs validated every epoch, the saves
            fall on the epochs where ``epoch % n_epochs == n_epochs - 1`` (like
            Lightning's ``every_n_epochs``).
        filename: plain file name; default ``last.pt``.
        overwrite: replace the file each time (``True``) or keep earlier ones under
            timestamped names (``False``).
        keep: with ``overwrite=False``, keep at most this many versions.

    >>> Every()
    Every(n_epochs=1, filename='last.pt', overwrite=True, keep=None)
    >>> Every(0)
    Traceback (most recent call last):
    ...
    ckptfn.ConfigError: n_epochs: expected an int >= 1, got int 0
    """

    n_epochs: int = attrs.field(default=1, converter=_to_count, validator=_check_n_epochs)
    filename: str = attrs.field(default=LAST_FILENAME, validator=check_filename)
    overwrite: bool = attrs.field(default=True, validator=check_bool)
    keep: int | None = attrs.field(default=None, converter=to_keep, validator=check_keep)

    @property
    def identity(self) -> tuple[str, str]:
        """What a saved periodic state refers to: ``("every", filename)``."""
        return ("every", self.filename)


def due(every: Every, last_epoch: int | None, epoch: int) -> bool:
    """Whether ``every`` saves at ``epoch``, given the epoch of its last save (None: never saved).

    It saves at the first epoch at or after each epoch ``g`` with
    ``(g + 1) % n_epochs == 0`` that is later than its last save. For epochs
    0, 1, 2, ... that is exactly ``epoch % n_epochs == n_epochs - 1``; when
    validation skips epochs, the save happens at the next validated epoch
    instead of being lost.

    >>> last, saved = None, []
    >>> for epoch in range(9):
    ...     if due(Every(3), last, epoch):
    ...         last = epoch
    ...         saved.append(epoch)
    >>> saved
    [2, 5, 8]
    >>> due(Every(4), None, 4), due(Every(4), 4, 6), due(Every(4), 4, 8)
    (True, False, True)

    When the epoch goes backwards (a resumed run counting from 0 again, a second
    training phase), the last save belongs to an earlier phase: the new phase saves
    as a fresh run would, so ``last.pt`` never stays at the old phase's epoch.

    >>> due(Every(1), 9, 0), due(Every(3), 9, 1), due(Every(3), 9, 2), due(Every(1), 9, 9)
    (True, False, True, False)
    """
    since = 0 if last_epoch is None or epoch < last_epoch else last_epoch + 1
    return (epoch + 1) // every.n_epochs > since // every.n_epochs
