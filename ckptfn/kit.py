"""The shell kit: what someone writing a new integration (a training loop, a callback) needs.

Stable and documented; every name here has a runnable example in its docstring.
An integration is thin: it calls ``ckptfn.step``, then these, in this order:

>>> import tempfile, torch, ckptfn
>>> from ckptfn import kit
>>> old = ckptfn.init([ckptfn.Strategy("val_loss"), ckptfn.Every(1, filename="last.pt")])
>>> with tempfile.TemporaryDirectory() as directory:
...     new, actions = ckptfn.step(old, {"val_loss": 0.5}, epoch=0)
...     saves, skips = kit.partition(actions)
...     snapshot = kit.plan(saves, state=new, metrics={"val_loss": 0.5})
...     written = kit.write(directory, snapshot, {"model": {"w": torch.zeros(2)}})
...     state = kit.state_to_keep(old.config, directory, old, new, written)
...     written.raise_error()
...     kit.notify(kit.hooks_of(None), saves, written.paths)  # the on_saved hooks: trackers, user code
...     [p.name for p in written.paths], kit.restore_from_directory(old.config, directory) == state
(['best_val_loss.pt', 'last.pt'], True)

After a committed write, ``notify(hooks, saves, written.paths)`` gives every
``on_saved`` hook (``hooks_of``) one ``Saved`` event per name.

The pure parts (``partition``, ``plan_snapshot``, ``commit``, ``roll_back``,
``plan_prune``, ``new_skips``) are functions of their arguments only; ``plan``,
``write``, ``state_to_keep``, ``restore_from_directory`` and ``read_metadata`` touch
the clock or the files. ``FileSystem`` is the seam all writes go through
(subclass it to count or fail operations in tests).
"""

from ckptfn.core.commit import Outcome, commit, roll_back
from ckptfn.core.events import Saved, saved_events
from ckptfn.core.retention import plan_prune
from ckptfn.core.snapshot import Snapshot, Target, partition, plan_snapshot
from ckptfn.core.state import resume_state
from ckptfn.core.step import new_skips, preempt, step_between_validations
from ckptfn.io.fs import REAL, FileSystem
from ckptfn.io.read import load_checkpoint, read_metadata, restore_from_directory
from ckptfn.io.verify import Verdict, verify_checkpoint
from ckptfn.io.write import Written, versions, write
from ckptfn.shells.preemption import Preemption, SignalWatch, honour_preemption
from ckptfn.shells.recipe import hooks_of, notify, plan, report_skips, state_to_keep, user_stacklevel, utc_now

__all__ = [
    "REAL",
    "FileSystem",
    "Outcome",
    "Preemption",
    "Saved",
    "SignalWatch",
    "Snapshot",
    "Target",
    "Verdict",
    "Written",
    "commit",
    "honour_preemption",
    "hooks_of",
    "load_checkpoint",
    "new_skips",
    "notify",
    "partition",
    "plan",
    "plan_prune",
    "plan_snapshot",
    "preempt",
    "read_metadata",
    "report_skips",
    "restore_from_directory",
    "resume_state",
    "roll_back",
    "saved_events",
    "state_to_keep",
    "step_between_validations",
    "user_stacklevel",
    "utc_now",
    "verify_checkpoint",
    "versions",
    "write",
]
