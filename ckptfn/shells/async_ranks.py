"""Asynchronous saving under a process group, and for sharded state.

The decision stays synchronous and shared: rank 0 runs ``step`` and broadcasts it
(``Coordinator``), so every rank knows at once what is saved and under which names.
Only the writing moves to the background, on the ranks that write:

- a replicated payload: rank 0 snapshots it into its staging buffers
  (``AsyncExecutor.stage``) and its background thread runs the one write function;
  the other ranks have nothing to write;
- a sharded payload (DTensors, ``sharded=True``): every rank copies its shards to CPU
  memory through DCP's ``async_save``, whose collectives run on a gloo group of the
  manager's own (made the first time, on every rank), beside the training loop's; on
  rank 0 the background thread then publishes the complete tree with the same
  atomic tree commit as a synchronous save (``write(..., tree=...)``).

At most one save is in flight. Its outcome is learnt by rank 0 and *reported* by it
with the next collective the manager makes anyway: the decision broadcast of the
next ``update`` (a save then waits for the one in flight; a call that saves nothing
does not wait, and reports it only once it is done), or the broadcast of ``wait``,
``close`` and of an update with ``barrier=True`` (or a preemption save). Every rank
follows the report, so a failure (on any rank: DCP shares its failures across ranks)
is raised on every rank at the same call, and every rank keeps the same rolled-back
state, read from the files by rank 0 (``roll_back``, ``state_to_keep``), exactly as
a single process does. Every rank must make these calls at the same points.
"""

from __future__ import annotations

from collections.abc import Mapping

from ckptfn.core.commit import Outcome, roll_back
from ckptfn.core.errors import CheckpointWriteError
from ckptfn.core.naming import dcp_name
from ckptfn.core.snapshot import partition
from ckptfn.core.state import State
from ckptfn.core.step import step
from ckptfn.core.wire import decision_from_wire, decision_to_wire, failure_from_wire, failure_to_wire, is_failure
from ckptfn.io.dcp import prepare_shards, start_shards
from ckptfn.io.objectstore import is_remote
from ckptfn.io.write import Written, interrupts_deferred, write
from ckptfn.shells.background import AsyncExecutor, as_write_error
from ckptfn.shells.distributed import Coordinated, Coordinator
from ckptfn.shells.recipe import state_to_keep

__all__ = ["AsyncCoordinator", "background_group"]

#: The report of a save in flight that is not done yet (or of no save at all).
_PENDING = None


def background_group(ranks: object) -> object:
    """A gloo process group over the ranks of ``ranks.group`` for DCP's background collectives
    (None for a single process). Made by every rank of that group at the same call, and only
    by them (``use_local_synchronization``)."""
    if ranks.group is None:
        return None
    import torch.distributed as dist

    members = dist.get_process_group_ranks(ranks.group)
    return dist.new_group(members, backend="gloo", use_local_synchronization=True)


class AsyncCoordinator(Coordinator):
    """``Coordinator`` with the writing on a background thread (``AsyncExecutor``).

    Holds what the save in flight needs to be judged later (rank 0: the state before its
    step, and its saves for the ``on_saved`` hooks); like ``Coordinator`` it holds none of
    the manager's state: every call takes the state and returns the one to keep.
    """

    def __init__(self, ranks: object, config, directory, sharded, writer: AsyncExecutor) -> None:
        super().__init__(ranks, config, directory, sharded)
        self.writer = writer
        self._group: object = None  # DCP's background group: made at the first sharded save
        self._group_made = False
        self._prior: State | None = None  # rank 0: the state before the step the save in flight writes
        self._saves: tuple = ()  # rank 0: that save's saves, for the hooks
        self._confirmed: tuple = ()  # rank 0: the last report's confirmed write, for the hooks
        self._failure: BaseException | None = None  # rank 0: the last report's error, raised as it is

    # --- the outcome of the save in flight ----------------------------------------------------

    def _report(self, believed: State, *, block: bool) -> tuple | None:
        """Rank 0: the outcome of the save in flight, as plain data for every rank: None while it
        runs (``block=False``), ``("ok", paths)``, or ``("failed", error, state to keep)``."""
        written = self.writer.collect(block=block)
        if written is None:
            return _PENDING
        prior, self._prior = self._prior, None
        saves, self._saves = self._saves, ()
        if written.error is None:
            self._confirmed = ((saves, written.paths),) if saves else ()
            return ("ok",)
        kept = believed
        if prior is not None:  # back to what the files hold for the strategies it was writing
            before = roll_back(believed, prior, written.outcome.names)
            kept = state_to_keep(self.config, self.directory, before, believed, written)
        self._failure = as_write_error(written)
        return ("failed", failure_to_wire(self._failure), decision_to_wire(kept, ()))

    def _follow(self, report: tuple | None) -> tuple[State | None, BaseException | None, tuple]:
        """Every rank, after rank 0's report: ``(state to keep, error, confirmed)``; the state and
        error are None unless the save failed. A rank with shards in flight collects them first."""
        if report is _PENDING:
            return None, None, ()
        if not self.ranks.is_coordinator:
            self.writer.collect(block=True)  # its shards: done, as DCP's last collective was
        confirmed, self._confirmed = self._confirmed, ()
        if report[0] == "ok":
            return None, None, confirmed
        _tag, failure, kept = report
        error, self._failure = self._failure or failure_from_wire(failure), None
        return decision_from_wire(self.config, kept)[0], error, ()

    def settle(self, state: State) -> Coordinated:
        """``wait``/``close`` across ranks: the save in flight finished and judged on every rank
        (one broadcast). The result's state is ``state``, or the rolled-back one and the error."""
        self._check_once()
        if self.ranks.is_coordinator:
            try:
                report = self._report(state, block=True)
            except Exception as error:
                self.ranks.share(failure_to_wire(error))
                raise
            self.ranks.share(report)
        else:
            report = self.ranks.share(None)
            if is_failure(report):
                raise failure_from_wire(report)
        kept, error, confirmed = self._follow(report)
        return Coordinated(state if kept is None else kept, (), (), error, confirmed)

    # --- the update --------------------------------------------------------------------------

    def update(
        self, state: State, metrics: Mapping, payload: object, position: Mapping, *, barrier: bool, decide=step
    ) -> Coordinated:
        """``CheckpointManager.update`` with ``async_save`` across ranks: returns once the payload
        is staged (on every rank, for sharded state) and the write handed to the background; the
        outcome of the previous save is learnt first, from rank 0, in the decision broadcast."""
        self._check_once()
        staged = []

        def stage_and_report(saves, sharded) -> tuple | None:  # rank 0, before sharing the decision
            if saves and not sharded:
                staged.append(self.writer.stage(payload))  # a PayloadError now, on every rank
            return self._report(state, block=bool(saves))  # one save in flight: wait for it to save

        new_state, actions, sharded, temp, snapshot, report = self._decide(
            state, metrics, payload, position, decide, then=stage_and_report
        )
        kept, error, confirmed = self._follow(report)
        if error is not None:  # the previous save failed: raised now, nothing of this call is done
            return Coordinated(kept, (), (), error)
        saves, _ = partition(actions)
        if not saves:
            return Coordinated(new_state, actions, (), confirmed=confirmed)
        paths = [self.directory / (dcp_name(save.filename) if sharded else save.filename) for save in saves]
        if sharded:
            if is_remote(self.directory):
                error = CheckpointWriteError(
                    f"{self.directory}: sharded (DCP) checkpoints need a local or shared file system path, not a URL"
                )
                return Coordinated(state, actions, (), error, confirmed)
            try:
                job = self._shards_job(temp, payload, snapshot)
            except Exception as error:  # the same on every rank: nothing was started anywhere
                return Coordinated(state, actions, (), error, confirmed)
        elif self.ranks.is_coordinator:
            (staged_payload,) = staged
            job = lambda hook: write(self.directory, snapshot, staged_payload, on_serialized=hook)  # noqa: E731
        else:
            job = None  # rank 0 writes a replicated payload alone
        with interrupts_deferred():  # handed over and remembered together
            if job is not None:
                self.writer.start(job, paths)
            if self.ranks.is_coordinator:
                self._prior, self._saves = state, snapshot.saves
        if barrier:  # on disk, and judged, on every rank before returning
            settled = self.settle(new_state)
            return Coordinated(settled.state, actions, () if settled.error else paths, settled.error, confirmed + settled.confirmed)
        return Coordinated(new_state, actions, paths, confirmed=confirmed)

    def _shards_job(self, temp: str, payload: object, snapshot) -> object:
        """Every rank: check the payload (one collective, so a ``PayloadError`` anywhere is raised
        everywhere before DCP starts), copy its shards to CPU and start DCP's background save;
        returns the job for this rank's writer thread (rank 0's also publishes the tree)."""
        mine = None
        try:
            prepared = prepare_shards(payload)
        except Exception as error:  # noqa: BLE001 - shared with every rank below
            mine = error
        problems = self.ranks.gather(None if mine is None else failure_to_wire(mine))
        for rank, failure in enumerate(problems):
            if failure is not None:
                raise mine if rank == self.ranks.rank else failure_from_wire(failure, rank)
        if not self._group_made:
            self._group, self._group_made = background_group(self.ranks), True
        coordinator = self.ranks.is_coordinator
        finish = start_shards(self.directory, temp, prepared, group=self._group, coordinator=coordinator)
        names = snapshot.filenames if snapshot is not None else ()
        tree = self.directory / temp

        def job(staging_done) -> Written:
            staging_done()  # the shards were copied before the job was queued
            try:
                finish()
            except BaseException as error:  # noqa: BLE001 - reported by rank 0 at the next collective
                return Written((), Outcome.failure(names), error)
            if not coordinator:
                return Written((), Outcome.success(()))
            return write(self.directory, snapshot, None, tree=tree)

        return job

