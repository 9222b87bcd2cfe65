"""Every use of Lightning's private names, in one place (checked with lightning 2.6.6).

``tests/test_purity.py`` keeps private Lightning names out of every other module.
"""

from __future__ import annotations

__all__ = ["dump_checkpoint", "val_check_time_interval"]


def dump_checkpoint(trainer: object) -> dict:
    """The complete Lightning checkpoint dict of ``trainer`` (what ``ModelCheckpoint`` saves),
    built on every rank: ``trainer._checkpoint_connector.dump_checkpoint``."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def val_check_time_interval(trainer: object) -> object:
    """The time-based validation interval of ``trainer`` (None when validation is not timed)."""
    return getattr(trainer, "_val_check_time_interval", None)
