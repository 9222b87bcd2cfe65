"""ckptfn: decide when a training run saves its best checkpoints, purely; save them safely.

The pure core (``init``, ``step``, ``scan``, ``improved``, the records) decides;
the executor (``execute``, ``load_checkpoint``, ``read_metadata``) performs its
actions on disk, crash-safely.
"""

from ckptfn._actions import Periodic, Save, Skip, improved
from ckptfn._async import AsyncExecutor
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
from ckptfn._every import Every
from ckptfn._executor import execute
from ckptfn._manager import CheckpointManager
from ckptfn._metrics import MISSING, lookup
from ckptfn._reading import load_checkpoint, read_metadata, restore_from_directory
from ckptfn._sharded import load_sharded
from ckptfn._state import Best, Last, State, restore
from ckptfn._strategy import Strategy
from ckptfn._version import __version__

__all__ = [
    "Action",
    "AsyncExecutor",
    "Best",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "Config",
    "ConfigError",
    "Every",
    "Last",
    "MISSING",
    "MetricTypeError",
    "MetricWarning",
    "PayloadError",
    "Periodic",
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
    "load_sharded",
    "lookup",
    "new_skips",
    "read_metadata",
    "restore",
    "restore_from_directory",
    "scan",
    "step",
]
