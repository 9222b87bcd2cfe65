"""ckptfn: decide when a training run saves its best checkpoints, purely; save them safely.

The pure core (``init``, ``step``, ``scan``, ``improved``, the records) decides;
later layers execute its actions on disk.
"""

from ckptfn._actions import Save, Skip, improved
from ckptfn._config import Config
from ckptfn._core import Action, best_values, init, scan, step
from ckptfn._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ConfigError,
    MetricTypeError,
    MetricWarning,
)
from ckptfn._state import Best, State, restore
from ckptfn._strategy import Strategy
from ckptfn._version import __version__

__all__ = [
    "Action",
    "Best",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "Config",
    "ConfigError",
    "MetricTypeError",
    "MetricWarning",
    "Save",
    "Skip",
    "State",
    "Strategy",
    "__version__",
    "best_values",
    "improved",
    "init",
    "restore",
    "scan",
    "step",
]
