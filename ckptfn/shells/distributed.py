"""Which ranks take part, and how rank 0's decision reaches the others.

The decision-sharing choice: **rank 0 decides, everyone obeys.** Rank 0 runs the
pure ``step`` on *its* metrics and broadcasts the outcome as plain data (see
``ckptfn.core.wire``); every other rank rebuilds the same ``State`` and actions
from it, whatever its own local metrics were. One broadcast per ``update``,
nothing else on the common path (with ``save_on``, one ``all_reduce`` of the
preemption flag before it: ``Ranks.agree``, so a signal delivered to one rank
stops every rank at the same decision). If you want the decision to use a global
metric (mean over ranks), reduce it before calling ``update`` (e.g. torchmetrics,
or ``torch.distributed.all_reduce``): ckptfn does not guess how to combine them.

The ranks must be configured alike: when the manager is built, every rank sends
its configuration to every other (one ``all_gather_object``, the only collective
outside ``update``), and if any differs every rank raises the same
``ConfigError``, naming the rank, the strategy, the field and both values, before
anything is read or written.

Nothing here runs in a single process: ``find_group`` returns None when no
process group is initialized, and the manager then takes its original path.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import socket
from collections.abc import Mapping

import attrs
import torch

from ckptfn.core.config import Config
from ckptfn.core.errors import CheckpointWriteError, ConfigError
from ckptfn.core.naming import dcp_name, temp_name
from ckptfn.core.snapshot import Snapshot, partition
from ckptfn.core.state import State
from ckptfn.core.step import step
from ckptfn.core.wire import (
    config_difference,
    config_to_wire,
    decision_from_wire,
    decision_to_wire,
    failure_from_wire,
    failure_to_wire,
    is_failure,
)
from ckptfn.io import torch_internals
from ckptfn.io.dcp import write_shards
from ckptfn.io.fs import REAL
from ckptfn.io.publish import sweep
from ckptfn.io.objectstore import is_remote, location
from ckptfn.io.read import restore_from_directory
from ckptfn.io.write import write
from ckptfn.shells.recipe import plan, state_to_keep

__all__ = ["SOLO", "Coordinated", "Coordinator", "Ranks", "contains_sharded", "find_group"]


def find_group(process_group: object = None) -> Ranks | None:
    """The ranks to coordinate: ``process_group`` if given, else the default group if
    one is initialized, else None (a single process: no coordination at all)."""
    import torch.distributed as dist

    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    return Ranks(process_group)


class Ranks:
    """A process group seen from this rank: who coordinates, and the few collectives ckptfn uses."""

    def __init__(self, group: object) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError(f"process_group: this process (global rank {dist.get_rank()}) is not a member of {group!r}")
        self.size = dist.get_world_size(group)
        self.coordinator = dist.get_global_rank(group, 0)

    @property
    def is_coordinator(self) -> bool:
        """Whether this process is rank 0 of the group (the one that decides and writes)."""
        return self.rank == 0

    def share(self, message: object) -> object:
        """Rank 0's ``message`` on every rank (others pass None). Send plain data only."""
        import torch.distributed as dist

        box = [message if self.is_coordinator else None]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def gather(self, message: object) -> list:
        """Every rank's ``message``, in rank order, on every rank. Send plain data only."""
        import torch.distributed as dist

        everyone: list = [None] * self.size
        dist.all_gather_object(everyone, message, group=self.group)
        return everyone

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank, on every rank: one ``all_reduce`` (MAX) of one
        integer, on the device the group's backend reduces on (CPU for gloo, the current GPU for NCCL)."""
        import torch.distributed as dist

        box = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_flag_device(self.group))
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.group)
        return bool(box.item())

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, size={self.size})"


def _flag_device(group: object) -> torch.device:
    """CPU unless the group reduces only on GPUs (NCCL without a CPU backend)."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "cpu" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class _Solo:
    """This process alone (no process group), with the ``Ranks`` interface: used for
    ``sharded=True`` without ``torch.distributed``."""

    group = None
    rank = 0
    size = 1
    is_coordinator = True

    def share(self, message: object) -> object:
        return message

    def gather(self, message: object) -> list:
        return [message]

    def barrier(self) -> None:
        pass

    def agree(self, flag: bool) -> bool:
        return bool(flag)

    def __repr__(self) -> str:
        return "SOLO"


SOLO = _Solo()


def contains_sharded(payload: object) -> bool:
    """Whether ``payload`` holds a DTensor or ShardedTensor anywhere (FSDP2 / tensor-parallel state dicts).

    >>> contains_sharded({"model": {"w": torch.zeros(2)}, "epoch": 3})
    False
    """
    kinds = torch_internals.sharded_tensor_types()
    if not kinds:
        return False
    stack, seen = [payload], set()
    while stack:
        value = stack.pop()
        if isinstance(value, kinds):
            return True
        if isinstance(value, torch.Tensor) or id(value) in seen:
            continue
        if isinstance(value, Mapping):
            seen.add(id(value))
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            seen.add(id(value))
            stack.extend(value)
    return False


# --- the manager's operations, done together -----------------------------------------------


def _fresh_tree_name(filename: str) -> str:
    """A hidden temporary tree name, owned by this process, for a sharded save of ``filename``."""
    token = secrets.token_hex(6)
    return temp_name(dcp_name(filename), os.getpid(), socket.gethostname(), token, namespace=REAL.pid_namespace())


@attrs.frozen
class Coordinated:
    """The outcome of one coordinated call on this rank: the state to keep, the step's
    actions, the paths written, the error to raise (after the state is kept) and the
    writes it confirmed."""

    state: State
    actions: tuple = attrs.field(converter=tuple)
    paths: tuple[pathlib.Path, ...] = attrs.field(converter=tuple)
    error: BaseException | None = attrs.field(default=None, eq=False)
    #: ``(saves, paths)`` of each write this call saw committed, for the ``on_saved`` hooks
    #: (rank 0 only; a background write is confirmed by a later call).
    confirmed: tuple = attrs.field(default=(), converter=tuple)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


class Coordinator:
    """The manager's distributed half: rank 0 decides and writes, every rank learns the
    outcome and keeps the same state. It holds no state of the manager's: each call
    takes the manager's state and returns the one to keep (``Coordinated``).

    Replicated payloads: rank 0 writes; with ``barrier`` every rank waits for it and
    learns the outcome. Sharded payloads: every rank writes its shards (DCP), rank 0
    publishes the tree, and every rank learns the outcome.
    """

    def __init__(self, ranks: object, config: Config, directory: pathlib.Path, sharded: bool | None) -> None:
        self.ranks = ranks
        self.config = config
        self.directory = location(directory)
        self.sharded = sharded
        self._checked = False
        self._problem: str | None = None  # how the ranks' configurations differ, once checked

    @property
    def is_coordinator(self) -> bool:
        """Whether this process is rank 0 of the group (the one that decides and writes)."""
        return self.ranks.is_coordinator

    def check_config(self, **settings: object) -> None:
        """Compare every rank's configuration (and ``settings``: the manager options that decide
        which collectives a rank makes) with rank 0's: one collective, when the manager is built.
        If any rank differs, every rank raises the same ``ConfigError``, naming the rank, the
        strategy, the field and both values.

        A coordinator built later (the process group appeared after the manager) checks
        at its first call instead, without settings.
        """
        self._checked = True
        self._problem = config_difference(self.ranks.gather(config_to_wire(self.config, **settings)))
        if self._problem is not None:
            raise ConfigError(self._problem)

    def _check_once(self) -> None:
        """Before the first coordinated call: the check, if not done yet; its error again if it failed
        (every rank has the same, so no rank goes on into a collective the others skip)."""
        if not self._checked:
            self.check_config()
        elif self._problem is not None:
            raise ConfigError(self._problem)

    def _is_sharded(self, payload: object) -> bool:
        return self.sharded if self.sharded is not None else contains_sharded(payload)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` (this rank's "a preemption signal came") is true on any rank, on
        every rank: one collective, so that every rank stops at the same decision."""
        self._check_once()
        return self.ranks.agree(flag)

    def _decide(self, state: State, metrics: Mapping, payload: object, position: Mapping, decide=step, then=None):
        """Rank 0 decides (``decide(state, metrics, **position)``, ``step`` by default) and shares
        ``(decision, sharded, temp name, extra)``; every rank returns ``(new_state, actions,
        sharded, temp name, snapshot, extra)``, the snapshot on rank 0 only. ``then(saves,
        sharded)``, on rank 0 after the decision, returns ``extra`` (plain data; None without
        ``then``). A failure on rank 0 (a bad metric, ...) is raised on every rank."""
        ranks = self.ranks
        if ranks.is_coordinator:
            try:
                new_state, actions = decide(state, metrics, **position)
                saves, _ = partition(actions)
                snapshot = plan(saves, state=new_state, metrics=metrics) if saves else None
                sharded = bool(saves) and self._is_sharded(payload)
                if sharded:
                    self.config.check_sharded()
                temp = _fresh_tree_name(saves[0].filename) if sharded else None
                extra = None if then is None else then(saves, sharded)
                message = (decision_to_wire(new_state, actions), sharded, temp, extra)
            except Exception as error:
                ranks.share(failure_to_wire(error))
                raise
            ranks.share(message)
            return new_state, actions, sharded, temp, snapshot, extra
        message = ranks.share(None)
        if is_failure(message):
            raise failure_from_wire(message)
        wire, sharded, temp, extra = message
        new_state, actions = decision_from_wire(self.config, wire)
        return new_state, actions, sharded, temp, None, extra

    def _share_outcome(self, error: BaseException | None, paths, kept: State | None) -> tuple:
        """Share rank 0's outcome (its paths or its failure, and the state it kept); on every
        rank ``(paths, state, error)`` as rank 0 has them (a collective)."""
        if self.ranks.is_coordinator:
            result = failure_to_wire(error) if error is not None else tuple(map(str, paths))
            self.ranks.share((result, None if kept is None else decision_to_wire(kept, ())))
            return paths, kept, error
        result, state_wire = self.ranks.share(None)
        state = None if state_wire is None else decision_from_wire(self.config, state_wire)[0]
        if is_failure(result):
            return (), state, failure_from_wire(result)
        return tuple(pathlib.Path(path) for path in result), state, None

    def update(
        self, state: State, metrics: Mapping, payload: object, position: Mapping, *, barrier: bool, decide=step
    ) -> Coordinated:
        """``CheckpointManager.update`` across ranks: rank 0 decides for everyone (one broadcast).
        ``position``: the keywords of ``decide`` (of ``step``: ``epoch``, ``global_step``, ``now``,
        ``preempted``); ``decide(state, metrics, **position)`` is the pure decision, ``step``
        unless given (a preemption between decisions passes one that calls ``preempt``)."""
        self._check_once()
        new_state, actions, sharded, temp, snapshot, _ = self._decide(state, metrics, payload, position, decide)
        saves, _ = partition(actions)
        if not saves:
            return Coordinated(new_state, actions, ())
        ranks = self.ranks
        if sharded and is_remote(self.directory):  # refused before any shard is written anywhere
            error = CheckpointWriteError(
                f"{self.directory}: sharded (DCP) checkpoints need a local or shared file system path, not a URL"
            )
            return Coordinated(state, actions, (), error)
        if sharded:  # a failure here is raised on every rank alike, and nothing changed
            try:
                write_shards(self.directory, temp, payload, group=ranks.group, coordinator=ranks.is_coordinator)
            except Exception as error:
                return Coordinated(state, actions, (), error)
        shared = sharded or barrier
        if not ranks.is_coordinator:
            if not shared:  # rank 0's decision; its write is not awaited
                return Coordinated(new_state, actions, [self.directory / save.filename for save in saves])
            paths, kept, error = self._share_outcome(None, (), None)
            return Coordinated(kept, actions, paths, error)
        written = write(self.directory, snapshot, payload, tree=self.directory / temp if sharded else None)
        kept = state_to_keep(self.config, self.directory, state, new_state, written)
        if shared:
            self._share_outcome(written.error, written.paths, kept)
        confirmed = [(snapshot.saves, written.paths)] if written.error is None else []
        return Coordinated(kept, actions, written.paths, written.error, confirmed)

    def save_one(self, state_dict: object, directory: pathlib.Path, snapshot: Snapshot) -> pathlib.Path:
        """``CheckpointManager.save_checkpoint`` across ranks: rank 0 writes a replicated
        payload (the others return its path at once); a sharded one is written by all and
        every rank learns the outcome."""
        self._check_once()
        ranks, (target,) = self.ranks, snapshot.targets
        if ranks.is_coordinator:
            sharded = self._is_sharded(state_dict)
            temp = _fresh_tree_name(target.filename) if sharded else None
            ranks.share((sharded, temp))
        else:
            sharded, temp = ranks.share(None)
        if not sharded:
            if not ranks.is_coordinator:
                return directory / target.filename
            written = write(directory, snapshot, state_dict)
            written.raise_error()
            return written.paths[0]
        write_shards(directory, temp, state_dict, group=ranks.group, coordinator=ranks.is_coordinator)
        if ranks.is_coordinator:
            written = write(directory, snapshot, None, tree=directory / temp)
            self._share_outcome(written.error, written.paths, None)  # a one-off save changes no state
            written.raise_error()
            return written.paths[0]
        paths, _, error = self._share_outcome(None, (), None)
        if error is not None:
            raise error
        return paths[0]

    def restore(self, *, verify: str = "structure") -> State:
        """Resuming across ranks: rank 0 tidies after dead writers and reads the checkpoints;
        every rank gets its state (no other rank needs to see the files). Rank 0's refusal
        (a file it cannot judge) is raised on every rank alike, never a hang."""
        self._check_once()
        if self.ranks.is_coordinator:
            try:
                if not is_remote(self.directory):
                    sweep(self.directory)
                state = restore_from_directory(self.config, self.directory, verify=verify)
            except Exception as error:
                self.ranks.share(failure_to_wire(error))
                raise
            self.ranks.share(decision_to_wire(state, ()))
            return state
        message = self.ranks.share(None)
        if is_failure(message):
            raise failure_from_wire(message)
        return decision_from_wire(self.config, message)[0]
