"""What each rank runs in tests/shells/test_distributed.py (module level, so the forkserver can import it).

Every worker is ``worker(rank, world, *args)`` inside an initialized gloo group
and returns plain data (tensors, lists, dicts, str) for the test to check.
"""

from __future__ import annotations

import os
import pathlib
import signal

import torch

import ckptfn
from ckptfn import CheckpointManager

TWO = [
    {"metric_name": "val_loss", "filename": "best_loss.pt"},
    {"metric_name": "val_corr", "mode": "max", "filename": "best_corr.pt", "overwrite": False},
]

#: Local validation metrics per rank and epoch, chosen so that ranks deciding alone would
#: disagree: rank 1 alone would save best_loss at epochs 0, 2 and best_corr at 0, 1, 3.
DDP_LOSS = {0: [1.0, 0.8, 0.9, 0.7], 1: [1.0, 1.2, 0.5, 0.6]}
DDP_CORR = {0: [0.1, 0.05, 0.3, 0.2], 1: [0.1, 0.2, 0.0, 0.4]}


class CountingCreates:
    """Counts files this process creates through ckptfn's file-system seam."""

    def __init__(self) -> None:
        self.count = 0
        original = ckptfn.io.fs.FileSystem.create

        def create(fs, path):
            self.count += 1
            return original(fs, path)

        ckptfn.io.fs.FileSystem.create = create


def ddp_one_decision(rank: int, world: int, out: str) -> dict:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    creates = CountingCreates()
    manager = CheckpointManager(out, TWO)
    returned, states = [], []
    for epoch in range(4):
        torch.manual_seed(100 + rank)  # each rank trains on its own data shard
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        metrics = {"val_loss": DDP_LOSS[rank][epoch], "val_corr": DDP_CORR[rank][epoch]}
        last = epoch == 3
        paths = manager.update(metrics, {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}, epoch, barrier=last)
        returned.append([p.name for p in paths])
        states.append(manager.state_dict())
        if last:  # barrier=True: rank 0's write is complete on every rank
            visible_after_barrier = all(p.exists() for p in paths)
    return {
        "returned": returned,
        "states": states,
        "creates": creates.count,
        "best": manager.best_values,
        "visible_after_barrier": visible_after_barrier,
        "weights": {k: v.clone() for k, v in model.module.state_dict().items()},
    }


def failures_reach_every_rank(rank: int, world: int, out: str) -> dict:
    manager = CheckpointManager(out, TWO)
    seen = []
    # 1. rank 0's metric is not a number: step fails on rank 0, every rank raises the same type
    bad = {"val_loss": "oops" if rank == 0 else 0.5, "val_corr": 0.1}
    try:
        manager.update(bad, {"w": torch.zeros(2)}, 0)
    except ckptfn.MetricTypeError as error:
        seen.append(("MetricTypeError", str(error)))
    # 2. rank 0's disk is full: with barrier=True every rank raises CheckpointWriteError, nobody moves on
    original = ckptfn.io.fs.FileSystem.write
    if rank == 0:

        def full(fs, raw, data):
            raise OSError(28, "No space left on device (injected)")

        ckptfn.io.fs.FileSystem.write = full
    try:
        manager.update({"val_loss": 0.5, "val_corr": 0.1}, {"w": torch.zeros(2)}, 1, barrier=True)
    except ckptfn.CheckpointWriteError as error:
        seen.append(("CheckpointWriteError", str(error)))
    ckptfn.io.fs.FileSystem.write = original
    after_failure = manager.state_dict()
    # 3. the ranks are still in step: the next epoch saves normally
    paths = manager.update({"val_loss": 0.4, "val_corr": 0.2}, {"w": torch.ones(2)}, 2, barrier=True)
    return {"seen": seen, "after_failure": after_failure, "paths": [p.name for p in paths], "state": manager.state_dict()}


# --- sharded (FSDP2 on CPU) ------------------------------------------------------------------

FSDP_LOSS = {0: [0.9, 0.7, 0.8, 0.6], 1: [0.5, 0.9, 0.1, 0.9]}
FSDP_CORR = {0: [0.1, 0.3, 0.4, 0.5], 1: [0.9, 0.0, 0.0, 0.0]}


def _fsdp(seed: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _train_step(model, optimizer, rank: int, epoch: int) -> None:
    torch.manual_seed(1000 * epoch + rank)
    optimizer.zero_grad()
    model(torch.randn(16, 8)).pow(2).mean().backward()
    optimizer.step()


def _payload(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _local(state_dict: dict) -> dict:
    return {key: value.to_local().clone() for key, value in state_dict.items()}


def _full(state_dict: dict) -> dict:
    return {key: value.full_tensor().clone() for key, value in state_dict.items()}


def fsdp_best_checkpoints(rank: int, world: int, out: str) -> dict:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, optimizer = _fsdp(seed=0, world=world)
    manager = CheckpointManager(out, TWO)  # sharded=None: DTensors in the payload make it sharded
    returned, kinds = [], set()
    for epoch in range(4):
        _train_step(model, optimizer, rank, epoch)
        payload = _payload(model, optimizer)
        kinds |= {type(v).__name__ for v in payload["model"].values()}
        metrics = {"val_loss": FSDP_LOSS[rank][epoch], "val_corr": FSDP_CORR[rank][epoch]}
        paths = manager.update(metrics, payload, epoch)
        returned.append([p.name for p in paths])
        if "best_loss.dcp" in returned[-1]:  # every rank gets the same paths: collectives stay aligned
            best_local, best_full = _local(payload["model"]), _full(payload["model"])
            best_exp_avg = payload["optim"]["state"]["0.weight"]["exp_avg"].to_local().clone()
    # load the best-loss checkpoint into a differently initialized sharded model
    fresh, fresh_optimizer = _fsdp(seed=1, world=world)
    template = _payload(fresh, fresh_optimizer)
    before = _local(template["model"])
    loaded, metadata = ckptfn.load_sharded(pathlib.Path(out) / "best_loss.dcp", template)
    set_state_dict(fresh, fresh_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    after = _payload(fresh, fresh_optimizer)
    return {
        "returned": returned,
        "state": manager.state_dict(),
        "kinds": sorted(kinds),
        "best_local": best_local,
        "best_full": best_full,
        "before_local": before,
        "loaded_local": _local(after["model"]),
        "best_exp_avg": best_exp_avg,
        "loaded_exp_avg": after["optim"]["state"]["0.weight"]["exp_avg"].to_local().clone(),
        "metadata_epoch": metadata["epoch"],
    }


RESUMED_LOSS = {0: [0.7, 0.55], 1: [0.0, 0.0]}
RESUMED_CORR = {0: [0.6, 0.4], 1: [0.0, 0.0]}


def fsdp_resume(rank: int, world: int, out: str, first_epoch: int) -> dict:
    model, optimizer = _fsdp(seed=2, world=world)
    manager = CheckpointManager(out, TWO, resume=True)
    resumed = manager.state_dict()
    returned = []
    for offset in range(2):
        epoch = first_epoch + offset
        _train_step(model, optimizer, rank, epoch)
        metrics = {"val_loss": RESUMED_LOSS[rank][offset], "val_corr": RESUMED_CORR[rank][offset]}
        returned.append([p.name for p in manager.update(metrics, _payload(model, optimizer), epoch)])
    return {"resumed": resumed, "returned": returned, "state": manager.state_dict(), "best": manager.best_values}


def sharded_save_killed(rank: int, world: int, out: str, victim: int, where: str) -> dict:
    """Epoch 0 commits best_loss.dcp; during epoch 1's save rank ``victim`` is SIGKILLed
    ``where`` = "writing" (inside DCP's shard writes) or "committing" (rank 0, just
    before the atomic exchange that would publish the new tree)."""
    from torch.distributed.checkpoint import FileSystemWriter

    model, optimizer = _fsdp(seed=0, world=world)
    manager = CheckpointManager(out, TWO)
    _train_step(model, optimizer, rank, 0)
    manager.update({"val_loss": 0.9, "val_corr": 0.1}, _payload(model, optimizer), 0)
    if rank == victim:
        if where == "writing":
            original = FileSystemWriter.write_data

            def write_data(self, plan, planner):
                future = original(self, plan, planner)  # this rank's shard file is on disk...
                os.kill(os.getpid(), signal.SIGKILL)  # ...and the rank dies before DCP's last collective
                return future

            FileSystemWriter.write_data = write_data
        else:

            def exchange(fs, a, b):
                os.kill(os.getpid(), signal.SIGKILL)

            ckptfn.io.fs.FileSystem.exchange = exchange
    _train_step(model, optimizer, rank, 1)
    manager.update({"val_loss": 0.5, "val_corr": 0.05}, _payload(model, optimizer), 1)
    return {"unexpected": "the save completed"}


# --- the README's torchrun scripts ------------------------------------------------------------


def torchrun_script(rank: int, world: int, script: str, cwd: str, port: int) -> str:
    """Run ``script`` as ``torchrun --standalone --nproc_per_node=world`` would (env:// rendezvous),
    in ``cwd``; its standard output."""
    import contextlib
    import io
    import runpy

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.chdir(cwd)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(script, run_name="__main__")
    return out.getvalue()


# --- ranks configured differently --------------------------------------------------------------

#: Per case: (rank 0's and rank 1's checkpoint configuration, rank 0's and rank 1's other arguments,
#: how the error every rank raises names the difference).
MISCONFIGURED = {
    "mode": (
        ([{"metric_name": "val_loss", "filename": "best.pt"}], [{"metric_name": "val_loss", "mode": "max", "filename": "best.pt"}]),
        ({}, {}),
        "rank 1 has strategies[0].mode='max' where rank 0 has 'min' (best.pt)",
    ),
    "filename": (
        ([{"metric_name": "val_loss"}], [{"metric_name": "val_loss", "filename": "other.pt"}]),
        ({}, {}),
        "rank 1 has strategies[0].filename='other.pt' where rank 0 has 'best_val_loss.pt' (best_val_loss.pt)",
    ),
    "number of strategies": (
        (TWO, TWO[:1]),
        ({}, {}),
        "rank 1 has 1 strategies ['best_loss.pt'] where rank 0 has 2 ['best_loss.pt', 'best_corr.pt']",
    ),
    "Every period": (
        ([{"every_n_epochs": 2}], [{"every_n_epochs": 3}]),
        ({}, {}),
        "rank 1 has strategies[0].n_epochs=3 where rank 0 has 2 (last.pt)",
    ),
    "resume": ((TWO, TWO), ({}, {"resume": False}), "rank 1 has resume=False where rank 0 has True"),
    "async_save": ((TWO, TWO), ({}, {"async_save": True}), "rank 1 has async_save=True where rank 0 has False"),
}


def expected_refusal(case: str) -> tuple[str, str]:
    """What every rank raises for ``MISCONFIGURED[case]``: the error type and its whole message."""
    return (
        "ConfigError",
        f"the ranks are configured differently: {MISCONFIGURED[case][2]}; every rank must build its "
        "CheckpointManager with the same checkpoint configuration",
    )


def configured_differently(rank: int, world: int, out: str, cases: list[str]) -> dict:
    """Each case builds a manager whose configuration differs on rank 1; then one built alike on
    every rank saves three epochs on the same process group (no collective was left misaligned)."""
    import torch.distributed as dist

    seen = {}
    for case in cases:
        configs, arguments, _ = MISCONFIGURED[case]
        try:
            CheckpointManager(pathlib.Path(out) / case, configs[rank], **arguments[rank])
        except ckptfn.ConfigError as error:
            seen[case] = ("ConfigError", str(error))
        except Exception as error:  # noqa: BLE001 - reported to the test
            seen[case] = (type(error).__name__, str(error))
        else:
            seen[case] = ("no error", "")
    calls = {"all_gather_object": 0, "broadcast_object_list": 0}
    for name in calls:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    manager = CheckpointManager(pathlib.Path(out) / "alike", TWO)
    at_construction = dict(calls)
    paths = [
        [p.name for p in manager.update({"val_loss": loss, "val_corr": 0.1}, {"w": torch.full((2,), loss)}, epoch, barrier=True)]
        for epoch, loss in enumerate([0.5, 0.4, 0.6])
    ]
    return {"seen": seen, "at_construction": at_construction, "after_updates": dict(calls), "paths": paths}
