"""Which ranks take part, and how rank 0's decision reaches the others.

The decision-sharing choice: **rank 0 decides, everyone obeys.** Rank 0 runs the
pure ``step`` on *its* metrics and broadcasts the outcome as plain data (see
``ckptfn._decision``); every other rank rebuilds the same ``State`` and actions
from it, whatever its own local metrics were. One broadcast per ``update``,
nothing else on the common path. If you want the decision to use a global
metric (mean over ranks), reduce it before calling ``update`` (e.g. torchmetrics,
or ``torch.distributed.all_reduce``): ckptfn does not guess how to combine them.

Nothing here runs in a single process: ``find_group`` returns None when no
process group is initialized, and the manager then takes its original path.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Mapping

import torch

from ckptfn._config import Config
from ckptfn._core import step
from ckptfn._decision import decision_from_wire, decision_to_wire, failure_from_wire, failure_to_wire, is_failure
from ckptfn._errors import CheckpointWriteError, ConfigError
from ckptfn._executor import Target, log_saves, partition, snapshot_of, write_snapshot
from ckptfn._reading import restore_from_directory
from ckptfn._sharded import commit_tree, dcp_name, new_temp_name, recover, write_shards
from ckptfn._state import State

__all__ = [
    "SOLO",
    "Ranks",
    "contains_sharded",
    "find_group",
    "restore_together",
    "save_one_together",
    "update_together",
]


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

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, size={self.size})"


class _Solo:
    """This process alone (no process group), with the ``Ranks`` interface: used for
    ``sharded=True`` without ``torch.distributed``."""

    group = None
    rank = 0
    size = 1
    is_coordinator = True

    def share(self, message: object) -> object:
        return message

    def barrier(self) -> None:
        pass

    def __repr__(self) -> str:
        return "SOLO"


SOLO = _Solo()


def _sharded_types() -> tuple[type, ...]:
    """Tensor classes whose data is spread over ranks (only if their module is loaded:
    a DTensor cannot exist before ``torch.distributed.tensor`` is imported)."""
    kinds = []
    tensor_module = sys.modules.get("torch.distributed.tensor")
    if tensor_module is not None:
        kinds.append(tensor_module.DTensor)
    sharded_tensor = sys.modules.get("torch.distributed._shard.sharded_tensor.api")
    if sharded_tensor is not None:
        kinds.append(sharded_tensor.ShardedTensor)
    return tuple(kinds)


def contains_sharded(payload: object) -> bool:
    """Whether ``payload`` holds a DTensor or ShardedTensor anywhere (FSDP2 / tensor-parallel state dicts).

    >>> contains_sharded({"model": {"w": torch.zeros(2)}, "epoch": 3})
    False
    """
    kinds = _sharded_types()
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


def _adopt(config: Config, state_wire: tuple) -> State:
    return decision_from_wire(config, state_wire)[0]


def _check_dcp_names(config: Config) -> None:
    """Sharded checkpoints are named by the filename's stem: two strategies must not share one."""
    seen: dict[str, str] = {}
    for strategy in config.strategies:
        name = dcp_name(strategy.filename)
        if name in seen:
            raise ConfigError(
                f"{seen[name]!r} and {strategy.filename!r} would both be saved as the sharded checkpoint {name!r}; "
                "give them different names before the suffix"
            )
        seen[name] = strategy.filename


def _decide(manager, ranks, metrics: Mapping, payload: object, epoch: int | None):
    """Rank 0 steps and shares ``(decision, sharded, temp name)``; every rank returns
    ``(new_state, actions, sharded, temp name, snapshot)``, the snapshot's targets and
    metadata on rank 0 (None elsewhere: only rank 0's are ever written).
    A failure on rank 0 (a bad metric, ...) is raised on every rank."""
    if ranks.is_coordinator:
        try:
            new_state, actions = step(manager.state, metrics, epoch)
            saves, _ = partition(actions)
            snapshot = snapshot_of(saves, state=new_state, metrics=metrics) if saves else None
            sharded = bool(saves) and (manager.sharded if manager.sharded is not None else contains_sharded(payload))
            if sharded:
                _check_dcp_names(manager.config)
            temp = new_temp_name(dcp_name(saves[0].filename)) if sharded else None
            message = (decision_to_wire(new_state, actions), sharded, temp)
        except Exception as error:
            ranks.share(failure_to_wire(error))
            raise
        ranks.share(message)
        return new_state, actions, sharded, temp, snapshot
    message = ranks.share(None)
    if is_failure(message):
        raise failure_from_wire(message)
    wire, sharded, temp = message
    new_state, actions = decision_from_wire(manager.config, wire)
    return new_state, actions, sharded, temp, None


def _settle(manager, ranks, outcome: object) -> list[pathlib.Path] | None:
    """Share rank 0's outcome (its paths, or its failure, plus the state it kept) so that
    every rank ends with rank 0's state and returns or raises alike (a collective)."""
    if ranks.is_coordinator:
        ranks.share((outcome, decision_to_wire(manager.state, ())))
        return None
    result, state_wire = ranks.share(None)
    manager.state = _adopt(manager.config, state_wire)
    if is_failure(result):
        raise failure_from_wire(result)
    return [pathlib.Path(path) for path in result]


def update_together(manager, ranks, metrics: Mapping, payload: object, epoch: int | None, *, barrier: bool) -> list[pathlib.Path]:
    """``CheckpointManager.update`` across ranks: rank 0 decides for everyone (one broadcast).

    Replicated payloads: rank 0 writes; with ``barrier`` every rank waits for it
    and learns the outcome. Sharded payloads: every rank writes its shards (DCP),
    rank 0 commits, and every rank learns the outcome.
    """
    new_state, actions, sharded, temp, snapshot = _decide(manager, ranks, metrics, payload, epoch)
    saves, _ = partition(actions)
    if ranks.is_coordinator:
        manager._report_skips(actions)
    if not saves:
        manager.state = new_state
        return []
    if sharded:  # a failure here is raised on every rank alike, and nothing changed
        write_shards(manager.output_dir, temp, payload, group=ranks.group, coordinator=ranks.is_coordinator)
    shared = sharded or barrier
    if not ranks.is_coordinator:
        if shared:
            return _settle(manager, ranks, None)
        manager.state = new_state  # rank 0's decision; its write is not awaited
        return [manager.output_dir / save.filename for save in saves]
    targets, metadata = snapshot
    failure: CheckpointWriteError | None = None
    try:
        if sharded:
            paths = commit_tree(manager.output_dir, manager.output_dir / temp, targets, metadata)
        else:
            paths = write_snapshot(manager.output_dir, targets, payload, metadata)
    except CheckpointWriteError as error:
        if error.published:  # the disk moved on for some names: believe the files
            manager.state = restore_from_directory(manager.config, manager.output_dir)
        failure = error
    else:
        log_saves(saves)
        manager.state = new_state
    if shared:
        _settle(manager, ranks, failure_to_wire(failure) if failure else tuple(map(str, paths)))
    if failure is not None:
        raise failure
    return list(paths)


def save_one_together(
    manager, ranks, state_dict: object, directory: pathlib.Path, target: Target, metadata: Mapping
) -> pathlib.Path:
    """``CheckpointManager.save_checkpoint`` across ranks: rank 0 writes a replicated
    payload (the others return its path at once); a sharded one is written by all
    and every rank learns the outcome."""
    if ranks.is_coordinator:
        sharded = manager.sharded if manager.sharded is not None else contains_sharded(state_dict)
        temp = new_temp_name(dcp_name(target.filename)) if sharded else None
        ranks.share((sharded, temp))
    else:
        sharded, temp = ranks.share(None)
    if not sharded:
        if ranks.is_coordinator:
            (written,) = write_snapshot(directory, [target], state_dict, metadata)
            return written
        return directory / target.filename
    write_shards(directory, temp, state_dict, group=ranks.group, coordinator=ranks.is_coordinator)
    if not ranks.is_coordinator:
        (path,) = _settle(manager, ranks, None)
        return path
    try:
        (written,) = commit_tree(directory, directory / temp, [target], metadata)
    except CheckpointWriteError as error:
        _settle(manager, ranks, failure_to_wire(error))
        raise
    _settle(manager, ranks, (str(written),))
    return written


def restore_together(config: Config, directory: pathlib.Path, ranks) -> State:
    """``resume=True`` across ranks: rank 0 tidies after killed sharded writers and reads the
    checkpoints; every rank gets its state (no other rank needs to see the files)."""
    if ranks.is_coordinator:
        recover(directory)
        state = restore_from_directory(config, directory)
        ranks.share(decision_to_wire(state, ()))
        return state
    return _adopt(config, ranks.share(None))
