"""ckptfn: decide when a training run saves its best checkpoints, purely; save them safely.

The pure core (``init``, ``step``, ``scan``, ``improved``, the records) decides;
the executor (``execute``, ``load_checkpoint``, ``read_metadata``) performs its
actions on disk, crash-safely.
"""

from ckptfn._actions import Save, Skip, improved
from ckptfn._config import Config
from ckptfn._core import Action, best_values, init, new_skips, scan, step
from ckptfn._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ConfigError,
    MetricTypeError,
    MetricWarning,
    PayloadError,
)
from ckptfn._executor import execute
from ckptfn._manager import CheckpointManager
from ckptfn._reading import load_checkpoint, read_metadata, restore_from_directory
from ckptfn._state import Best, State, restore
from ckptfn._strategy import Strategy
from ckptfn._version import __version__

__all__ = [
    "Action",
    "Best",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "Config",
    "ConfigError",
    "MetricTypeError",
    "MetricWarning",
    "PayloadError",
    "Save",
    "Skip",
    "State",
    "Strategy",
    "__version__",
    "best_values",
    "execute",
    "improved",
    "init",
    "load_checkpoint",
    "new_skips",
    "read_metadata",
    "restore",
    "restore_from_directory",
    "scan",
    "step",
]
