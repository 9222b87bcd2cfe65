"""What each rank runs in tests/shells/test_async_ranks.py: ``async_save=True`` under a
process group (module level, so the forkserver can import it).

Every worker is ``worker(rank, world, *args)`` inside an initialized gloo group and returns
plain data for the test to check.
"""

from __future__ import annotations

import errno
import os
import signal
import threading

import torch

import ckptfn
from ckptfn import CheckpointManager

from tests.distributed.workers import DDP_CORR, DDP_LOSS, FSDP_CORR, FSDP_LOSS, TWO, CountingCreates, _fsdp, _local, _payload, _train_step


def _disk_full_once_on(rank: int, victim: int, armed: dict) -> None:
    """On rank ``victim``: the first file write after ``armed["on"]`` is set raises ENOSPC (and
    disarms), so the one snapshot being written then fails, whichever thread writes it."""
    if rank != victim:
        return
    original = ckptfn.io.fs.FileSystem.write

    def write(fs, raw, data):
        if armed["on"]:
            armed["on"] = False
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return original(fs, raw, data)

    ckptfn.io.fs.FileSystem.write = write


def _threads_that_call(owner: object, name: str) -> list[str]:
    """The names of the threads that call ``owner.name`` from now on, in call order."""
    threads, original = [], getattr(owner, name)

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    setattr(owner, name, recording)
    return threads


def ddp_async(rank: int, world: int, out: str) -> dict:
    """Four epochs of DDP with async_save: what every rank returns and keeps, what rank 0's hooks
    heard, and whether the payload changed after ``update`` returned reached a file."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    creates = CountingCreates()
    writers = _threads_that_call(ckptfn.io.fs.FileSystem, "write")
    heard = []
    manager = CheckpointManager(out, TWO, async_save=True, on_saved=lambda event: heard.append((event.name, event.epoch)))
    returned, states, saved_weights = [], [], {}
    for epoch in range(4):
        torch.manual_seed(100 + rank)
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        metrics = {"val_loss": DDP_LOSS[rank][epoch], "val_corr": DDP_CORR[rank][epoch]}
        payload = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}
        paths = manager.update(metrics, payload, epoch)
        saved_weights[epoch] = {k: v.clone() for k, v in payload["model"].items()}
        with torch.no_grad():  # the loop goes on at once: the background write must not see this
            for parameter in model.parameters():
                parameter.add_(1000.0)
        returned.append([p.name for p in paths])
        states.append(manager.state_dict())
    manager.close()  # every rank: rank 0's last write is on disk and judged
    return {
        "returned": returned,
        "states": states,
        "creates": creates.count,
        "heard": heard,
        "writers": sorted(set(writers)),
        "best": manager.best_values,
        "saved_weights": saved_weights,
    }


def ddp_async_failure(rank: int, world: int, out: str, where: str) -> dict:
    """Rank 0's background write of epoch 1 fails (disk full). ``where``: the failure is learnt
    at the next ``update`` (which saves) or at ``wait``. Every rank must raise it at the same call,
    keep the same rolled-back state, and save normally afterwards."""
    armed = {"on": False}
    _disk_full_once_on(rank, 0, armed)
    manager = CheckpointManager(out, TWO, async_save=True)
    seen = []
    manager.update({"val_loss": 0.9, "val_corr": 0.1}, {"w": torch.zeros(2)}, 0)
    manager.wait()
    armed["on"] = True
    returned = [p.name for p in manager.update({"val_loss": 0.5, "val_corr": 0.2}, {"w": torch.ones(2)}, 1)]
    believed = manager.state_dict()  # committed when handed over, like a single process
    try:
        if where == "update":
            manager.update({"val_loss": 0.4, "val_corr": 0.3}, {"w": torch.full((2,), 2.0)}, 2)
        else:
            manager.wait()
    except ckptfn.CheckpointWriteError as error:
        seen.append(str(error))
    after_failure = manager.state_dict()
    paths = [p.name for p in manager.update({"val_loss": 0.3, "val_corr": 0.4}, {"w": torch.full((2,), 3.0)}, 3, barrier=True)]
    manager.close()
    return {"returned": returned, "believed": believed, "seen": seen, "after_failure": after_failure,
            "paths": paths, "state": manager.state_dict()}


def fsdp_async(rank: int, world: int, out: str) -> dict:
    """FSDP2 with async_save: sharded saves through DCP's async_save; the shards changed after
    ``update`` returned must not reach the trees."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict_saver

    model, optimizer = _fsdp(seed=0, world=world)
    started = _threads_that_call(dcp, "async_save")
    saved = _threads_that_call(state_dict_saver, "save")
    manager = CheckpointManager(out, TWO, async_save=True)
    returned, states = [], []
    for epoch in range(4):
        _train_step(model, optimizer, rank, epoch)
        payload = _payload(model, optimizer)
        metrics = {"val_loss": FSDP_LOSS[rank][epoch], "val_corr": FSDP_CORR[rank][epoch]}
        paths = manager.update(metrics, payload, epoch)
        returned.append([p.name for p in paths])
        if "best_loss.dcp" in returned[-1]:
            best_local = _local(payload["model"])
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1000.0)  # the shards DCP staged are copies: this must not reach the tree
        states.append(manager.state_dict())
    manager.close()
    fresh, fresh_optimizer = _fsdp(seed=1, world=world)
    loaded, metadata = ckptfn.load_sharded(os.path.join(out, "best_loss.dcp"), _payload(fresh, fresh_optimizer))
    set_state_dict(fresh, fresh_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    return {
        "returned": returned,
        "states": states,
        "started": started,
        "saved": sorted(set(saved)),
        "best_local": best_local,
        "loaded_local": _local(_payload(fresh, fresh_optimizer)["model"]),
        "metadata_epoch": metadata["epoch"],
    }


def fsdp_async_failure(rank: int, world: int, out: str, victim: int) -> dict:
    """Rank ``victim``'s background shard write of epoch 1 fails; ``wait`` raises it on every
    rank, the state rolls back to the trees, and epoch 2 saves normally."""
    from torch.distributed.checkpoint import FileSystemWriter

    model, optimizer = _fsdp(seed=0, world=world)
    manager = CheckpointManager(out, TWO, async_save=True)
    _train_step(model, optimizer, rank, 0)
    manager.update({"val_loss": 0.9, "val_corr": 0.1}, _payload(model, optimizer), 0)
    manager.wait()
    failing = {"on": rank == victim}
    original = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if failing["on"]:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return original(self, plan, planner)

    FileSystemWriter.write_data = write_data
    _train_step(model, optimizer, rank, 1)
    returned = [p.name for p in manager.update({"val_loss": 0.5, "val_corr": 0.2}, _payload(model, optimizer), 1)]
    seen = []
    try:
        manager.wait()
    except ckptfn.CheckpointWriteError as error:
        seen.append(str(error))
    failing["on"] = False
    after_failure = manager.state_dict()
    _train_step(model, optimizer, rank, 2)
    paths = [p.name for p in manager.update({"val_loss": 0.4, "val_corr": 0.05}, _payload(model, optimizer), 2)]
    manager.close()
    return {"returned": returned, "seen": seen, "after_failure": after_failure, "paths": paths,
            "state": manager.state_dict(), "hidden": sorted(n for n in os.listdir(out) if n.startswith("."))}


def fsdp_async_killed(rank: int, world: int, out: str, victim: int) -> dict:
    """Epoch 0 commits; during epoch 1's background save rank ``victim`` is SIGKILLed once its
    shard file is written (before DCP's last collective)."""
    from torch.distributed.checkpoint import FileSystemWriter

    model, optimizer = _fsdp(seed=0, world=world)
    manager = CheckpointManager(out, TWO, async_save=True)
    _train_step(model, optimizer, rank, 0)
    manager.update({"val_loss": 0.9, "val_corr": 0.1}, _payload(model, optimizer), 0)
    manager.wait()
    if rank == victim:
        original = FileSystemWriter.write_data

        def write_data(self, plan, planner):
            future = original(self, plan, planner)
            os.kill(os.getpid(), signal.SIGKILL)
            return future

        FileSystemWriter.write_data = write_data
    _train_step(model, optimizer, rank, 1)
    manager.update({"val_loss": 0.5, "val_corr": 0.05}, _payload(model, optimizer), 1)
    manager.wait()
    return {"unexpected": "the save completed"}


def leaving_with_an_exception(rank: int, world: int, out: str) -> dict:
    """Both ranks leave the manager's ``with`` block with an exception right after an update that
    saves: each closes alone (no collective), rank 0's background write still lands."""
    calls = _threads_that_call(torch.distributed, "broadcast_object_list")
    try:
        with CheckpointManager(out, TWO, async_save=True) as manager:
            manager.update({"val_loss": 0.5, "val_corr": 0.2}, {"w": torch.ones(2)}, 0)
            before = len(calls)
            raise ValueError(f"the loop failed on rank {rank}")
    except ValueError as error:
        raised = str(error)
    return {"raised": raised, "collectives_on_exit": len(calls) - before, "best": manager.best_values}
