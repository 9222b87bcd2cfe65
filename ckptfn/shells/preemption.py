"""Preemption: a signal is recorded, the save happens at the next safe point, the loop stops.

Clusters announce a preemption with a signal and a grace period (SLURM
``--signal=USR1@90``, Kubernetes SIGTERM then SIGKILL after
``terminationGracePeriodSeconds``). Saving *inside* a signal handler can hang or
corrupt the file: the handler runs between two bytecodes of whatever the main thread
was doing (a ``torch.save``, a collective, a lock held). So the handler installed here
only records the signal, and the shell acts on the record at its next safe point:

1. ``watch.requested_on(ranks)``: whether a signal came (on any rank: one collective;
   none in a single process);
2. the pure decision ``ckptfn.core.step.preempt`` (between decisions) or
   ``step(..., preempted=True)`` (at one): every ``Every`` strategy's file
   (``last.pt``) now, whatever its period and the metrics;
3. the usual recipe inside ``watch.deferred()``: ``plan``, the one ``write``, the commit
   rule (``ckptfn.shells.recipe``);
4. ``watch.honour(...)`` once committed (``honour_preemption`` takes it from the save's
   actions): the ``Preemption`` record; the loop stops.

The rules, which every shell inherits from ``SignalWatch``:

- Handlers are installed from the main thread only (Python runs signal handlers there),
  else ``RuntimeError``. A previous handler that is Python code is chained (called
  after the record; not ``SIG_DFL``, ``SIG_IGN`` or Python's ``default_int_handler``,
  which would end the process the save is meant to outlive); ``close`` puts the
  previous handlers back. A watch that is garbage-collected unclosed passes every
  signal to the previous handler, so a forgotten one never swallows SIGTERM.
- A signal that comes while a save is written never interrupts it: the handler only
  records it, and a chained handler held back by ``deferred()`` runs after the write.
- Every recorded signal is honoured by a preemption save that completes after it. One
  that comes during the preemption save itself is covered by it (that save holds the
  latest state: no training step runs inside it); one that comes during any other save
  is honoured at the next safe point.

An integration (a Lightning or Hugging Face callback) follows the same four steps::

    watch = SignalWatch(config.save_on)               # setup, main thread
    if watch.requested_on(ranks):                     # a safe point (see requested_on)
        new, actions = preempt(old, epoch, global_step=step, now=time.monotonic())
        with watch.deferred():
            ...                                       # partition, plan, write, state_to_keep
        written.raise_error()
        record = honour_preemption(watch, actions, written.paths)  # watch.honour at the save's position
        trainer.should_stop = True                    # or control.should_training_stop
    watch.close()                                     # teardown

At a decision, ``step(old, metrics, ..., preempted=True)`` takes the place of ``step``.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import pathlib
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

import attrs

from ckptfn.core.actions import Periodic
from ckptfn.core.config import Config
from ckptfn.core.errors import ConfigError
from ckptfn.io.objectstore import location

__all__ = ["Preemption", "SignalWatch", "check_main_thread", "honour_preemption", "signal_names", "with_save_on"]

logger = logging.getLogger("ckptfn")


@attrs.frozen
class Preemption:
    """What a committed preemption save did: the signals it honoured on this rank (empty on a
    rank that another rank's signal stopped), the position it saved at, and the files.

    >>> Preemption(("SIGTERM",), epoch=3, global_step=1200, paths=("run/last.pt",))
    Preemption(signals=('SIGTERM',), epoch=3, global_step=1200, paths=(PosixPath('run/last.pt'),))
    >>> Preemption((), paths=["s3://bucket/run/last.pt"]).paths[0].name  # a URL stays a URL
    'last.pt'
    """

    signals: tuple[str, ...] = attrs.field(converter=tuple)
    epoch: int | None = None
    global_step: int | None = None
    #: local ``pathlib.Path`` objects, or ``RemotePath`` URLs for a remote directory (``s3://...``)
    paths: tuple[pathlib.Path, ...] = attrs.field(default=(), converter=lambda paths: tuple(map(location, paths)))


def signal_names(save_on: object) -> tuple[str, ...]:
    """``save_on`` (None, one signal, or a sequence of names such as ``"SIGTERM"``, numbers or
    ``signal.Signals``) as the names of signals this platform has, in order, without repeats.

    >>> signal_names(("SIGTERM", signal.SIGUSR1, int(signal.SIGTERM)))
    ('SIGTERM', 'SIGUSR1')
    >>> signal_names("SIGFOO")
    Traceback (most recent call last):
    ...
    ckptfn.ConfigError: save_on[0]: 'SIGFOO' is not a signal of this platform
    """
    if save_on is None:
        return ()
    items = (save_on,) if isinstance(save_on, (str, numbers.Integral)) else save_on
    if not isinstance(items, Iterable):
        raise ConfigError(f"expected signal names or numbers, got {type(save_on).__name__} {save_on!r}", "save_on")
    names: list[str] = []
    for index, item in enumerate(items):
        name = _name_of(item, f"save_on[{index}]")
        if name not in names:
            names.append(name)
    Config(save_on=tuple(names))  # the core's rules: plain names, catchable
    return tuple(names)


def _name_of(item: object, path: str) -> str:
    if isinstance(item, numbers.Integral) and not isinstance(item, bool):
        try:
            return signal.Signals(int(item)).name
        except ValueError:
            raise ConfigError(f"{item!r} is not a signal number of this platform", path) from None
    if isinstance(item, str):
        try:
            Config(save_on=(item,))
        except ConfigError as error:
            raise ConfigError(error.detail, path) from None
        if item not in signal.Signals.__members__:
            raise ConfigError(f"{item!r} is not a signal of this platform", path)
        return item
    raise ConfigError(f"expected a signal name or number, got {type(item).__name__} {item!r}", path)


def with_save_on(config: Config, save_on: object) -> Config:
    """``config`` with the signals of ``save_on`` added to its own ``save_on`` (both checked
    against this platform); the config's rules apply (an active one needs an ``Every``).

    >>> from ckptfn.core.every import Every
    >>> with_save_on(Config([Every()], save_on=("SIGTERM",)), ["SIGUSR1", "SIGTERM"]).save_on
    ('SIGTERM', 'SIGUSR1')
    """
    names = signal_names(config.save_on + tuple(signal_names(save_on)))
    return config if names == config.save_on else attrs.evolve(config, save_on=names)


def check_main_thread(what: str = "save_on") -> None:
    """Raise ``RuntimeError`` unless this is the main thread, the only one that may install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            f"{what} installs signal handlers, which Python allows only in the main thread "
            f"(this is {threading.current_thread().name!r}): build it in the main thread, or leave {what} out"
        )


def _chainable(handler: object) -> bool:
    """Whether a previous handler is Python code to call after the record (not the default
    action, ignoring, or Python's KeyboardInterrupt, which would end what the save must outlive)."""
    return callable(handler) and handler is not signal.default_int_handler


def _handler(watch: SignalWatch, previous: object) -> Callable:
    """The installed handler: records into ``watch`` while it lives and is open, else behaves
    as ``previous`` would (its default action included)."""
    ref = weakref.ref(watch)

    def record_signal(number: int, frame: object) -> None:
        owner = ref()
        if owner is not None and not owner.closed:
            owner._record(number, frame, previous)
            return
        if callable(previous):
            previous(number, frame)
        elif previous == signal.SIG_DFL and threading.current_thread() is threading.main_thread():
            signal.signal(number, signal.SIG_DFL)  # the owner is gone: its default action, as if never installed
            os.kill(os.getpid(), number)

    return record_signal


class SignalWatch:
    """Record the signals named in ``save_on`` (names or numbers); nothing else happens in the handler.

    ``chain=False``: never call the previous handlers (an integration whose framework's own
    handler would save inside the signal handler, or end the process, turns them off this way);
    they are still put back by ``close``.

    >>> import os
    >>> watch = SignalWatch(["SIGUSR1"])
    >>> watch.requested
    False
    >>> os.kill(os.getpid(), signal.SIGUSR1)  # Python runs the handler before the next line
    >>> watch.requested, watch.pending
    (True, ('SIGUSR1',))
    >>> watch.honour(epoch=2, global_step=40, paths=["run/last.pt"]).signals, watch.requested
    (('SIGUSR1',), False)
    >>> watch.close(); signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    True
    """

    def __init__(self, save_on: object, *, chain: bool = True) -> None:
        check_main_thread()
        self.signals = signal_names(save_on)
        self.chain = chain
        self.closed = False
        self._received: list[str] = []  # appended by the handler only (atomic), read by the shell
        self._honoured = 0  # how many of _received a committed preemption save covers
        self._deferring = 0
        self._held: list[tuple[Callable, int, object]] = []
        self._installed: dict[int, tuple[Callable, object]] = {}
        for name in self.signals:
            number = signal.Signals[name]
            previous = signal.getsignal(number)
            handler = _handler(self, previous)
            signal.signal(number, handler)
            self._installed[number] = (handler, previous)

    # --- the handler's side: record, chain (or hold back during a save) -------------------------

    def _record(self, number: int, frame: object, previous: object) -> None:
        self._received.append(signal.Signals(number).name)
        if not self.chain or not _chainable(previous):
            return
        if self._deferring:
            self._held.append((previous, number, frame))
        else:
            previous(number, frame)

    # --- the shell's side ----------------------------------------------------------------------

    @property
    def pending(self) -> tuple[str, ...]:
        """The signals recorded on this rank and not yet honoured by a committed preemption save."""
        return tuple(self._received[self._honoured:])

    @property
    def requested(self) -> bool:
        """Whether a signal came on this rank that no committed preemption save has honoured yet."""
        return len(self._received) > self._honoured

    def requested_on(self, ranks: object = None) -> bool:
        """``requested`` on any rank of ``ranks``, on every rank: one collective that every rank
        must make at the same point. ``ranks``: anything with ``agree(flag) -> bool``
        (``ckptfn.shells.distributed.Ranks``, a ``Coordinator``, or a two-line adapter over a
        framework's own collective, e.g. Lightning's
        ``trainer.strategy.reduce_boolean_decision(flag, all=False)``); ``None``: this process
        alone, no collective."""
        if ranks is None:
            return self.requested
        return ranks.agree(self.requested)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Around a write and its commit: signals are still recorded, but a chained previous
        handler is held back and run when the (outermost) block ends, after the write."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring:
                held, self._held = self._held, []
                for previous, number, frame in held:
                    previous(number, frame)

    def honour(self, *, epoch: int | None = None, global_step: int | None = None, paths: Iterable = ()) -> Preemption:
        """After a committed preemption save: every signal recorded until now is honoured by it
        (those that came while it was written included); its ``Preemption`` record."""
        count = len(self._received)
        signals = tuple(self._received[self._honoured:count])
        self._honoured = count
        return Preemption(signals, epoch=epoch, global_step=global_step, paths=tuple(paths))

    def close(self) -> None:
        """Put the previous handlers back (where ours is still the installed one; a handler
        installed over ours keeps working, ours then only passes signals on). Idempotent.
        Off the main thread nothing can be reinstalled: ours then behave as the previous ones."""
        if self.closed:
            return
        self.closed = True
        if self.requested:
            logger.warning(
                "%s came after the last safe point (update / check_preemption, or a callback's step or evaluation end) "
                "and no preemption save was made for it",
                ", ".join(self.pending),
            )
        if threading.current_thread() is not threading.main_thread():
            return
        for number, (handler, previous) in self._installed.items():
            if signal.getsignal(number) is handler and previous is not None:  # None: set outside Python
                signal.signal(number, previous)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pending={self.pending!r}"
        return f"SignalWatch({list(self.signals)!r}, {state})"


def honour_preemption(watch: SignalWatch, actions: Iterable, paths: Iterable, *, loud: bool = True) -> Preemption:
    """Step 4 of the protocol, after the preemption save committed: ``watch.honour`` at the
    position (epoch, global step) of the save's ``Periodic`` actions, and, when ``loud`` (rank
    0), a WARNING on the ``ckptfn`` logger that the loop should stop. The ``Preemption`` record.

    >>> import os
    >>> from ckptfn.core.every import Every
    >>> from ckptfn.core.step import init, preempt
    >>> watch = SignalWatch(["SIGUSR1"])
    >>> os.kill(os.getpid(), signal.SIGUSR1)
    >>> _, actions = preempt(init([Every(filename="last.pt")]), 2, global_step=40)
    >>> honour_preemption(watch, actions, ["run/last.pt"], loud=False)
    Preemption(signals=('SIGUSR1',), epoch=2, global_step=40, paths=(PosixPath('run/last.pt'),))
    >>> watch.requested, watch.close()
    (False, None)
    """
    periodic = next((action for action in actions if isinstance(action, Periodic)), None)
    record = watch.honour(
        epoch=None if periodic is None else periodic.epoch,
        global_step=None if periodic is None else periodic.global_step,
        paths=paths,
    )
    if loud:
        logger.warning(
            "preempted (%s): saved %s; stop the training loop",
            ", ".join(record.signals) or "a signal to another rank",
            ", ".join(path.name for path in record.paths),
        )
    return record
