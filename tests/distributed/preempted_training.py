"""A small training run that a test preempts with a real signal (tests/shells/test_preemption.py,
tests/distributed/test_preempted_ranks.py).

Run as ``python -m tests.distributed.preempted_training DIRECTORY [options]`` from the repository
root. It trains a tiny MLP with Adam on batches that depend only on the step (and the rank), calls
``manager.update`` every step (``--mode update``) or every ``--every`` steps with
``manager.check_preemption`` in between (``--mode check``), prints ``step N`` after each step and
stops once ``manager.preempted`` (or ``check_preemption``) says so. Then it saves its in-memory
model and optimizer as ``final<rank>.pt`` and prints one JSON line: where it stopped and why.

``--resume`` loads ``last.pt`` first (and saves what it restored as ``resumed<rank>.pt``).
``--big MB`` adds a tensor of that size to the payload; ``--arm N`` holds the first chunk of the
first N writes until a new signal has been recorded (printing ``writing K`` first), so that the
test's signal is handled inside ``torch.save``. With ``--world 2`` it joins a gloo group through
the file store ``--store`` and wraps the model in DDP; rank 0 alone writes.

The functions ``build``, ``train_step`` and ``payload`` are imported by the tests to compute the
uninterrupted reference run in-process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import signal
import sys
import time

import torch

import ckptfn

SAVE_ON = ("SIGTERM", "SIGUSR1")


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int = 0) -> float:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    x, y = torch.randn(32, 16, generator=generator), torch.randn(32, 1, generator=generator)
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, big: torch.Tensor | None = None) -> dict:
    module = getattr(model, "module", model)  # DDP
    state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    if big is not None:
        state["big"] = big
    return state


def arm_writes(count: int, watch_of) -> dict:
    """Hold the first chunk of each of the next ``count`` writes until a new signal was recorded;
    ``armed["writing"]`` is True while the manager's one write function runs."""
    import ckptfn.io.fs
    import ckptfn.shells.manager

    original, original_write = ckptfn.io.fs.FileSystem.write, ckptfn.shells.manager.write
    armed = {"left": count, "writes": 0, "writing": False, "held": False}

    def snapshot_write(*args, **kwargs):
        armed["writing"], armed["held"] = True, False
        try:
            return original_write(*args, **kwargs)
        finally:
            armed["writing"] = False

    def write(fs, raw, data):
        if armed["left"] and armed["writing"] and not armed["held"]:
            armed["left"] -= 1
            armed["held"] = True
            armed["writes"] += 1
            watch = watch_of()
            seen = len(watch._received)
            print(f"writing {armed['writes']}", flush=True)
            deadline = time.monotonic() + 30
            while len(watch._received) == seen and time.monotonic() < deadline:
                time.sleep(0.002)  # the handler runs here, inside torch.save's write callback
        return original(fs, raw, data)

    ckptfn.io.fs.FileSystem.write = write
    ckptfn.shells.manager.write = snapshot_write
    return armed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--mode", choices=("update", "check"), default="update")
    parser.add_argument("--every", type=int, default=10, help="with --mode check: update every N steps")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=2000, help="the last step (the run stops there at the latest)")
    parser.add_argument("--pause", type=float, default=0.02)
    parser.add_argument("--big", type=int, default=0)
    parser.add_argument("--arm", type=int, default=0)
    parser.add_argument("--chain", action="store_true", help="a SIGTERM handler of the user's, installed first")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--store", default="")
    parser.add_argument("--count-collectives", action="store_true", help="count ckptfn's all_reduce calls")
    parser.add_argument("--async-save", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    directory, rank = pathlib.Path(args.directory), args.rank
    if args.world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{args.store}", rank=rank, world_size=args.world,
            timeout=dt.timedelta(seconds=30),
        )
    creates = {"count": 0}
    original_create = ckptfn.io.fs.FileSystem.create

    def counting_create(fs, path):
        creates["count"] += 1
        return original_create(fs, path)

    ckptfn.io.fs.FileSystem.create = counting_create
    all_reduce, agreements = torch.distributed.all_reduce, {"count": 0}
    if args.count_collectives:  # ckptfn's agreement is the only all_reduce through the Python API below
        def counting_all_reduce(*a, **k):
            agreements["count"] += 1
            return all_reduce(*a, **k)

        torch.distributed.all_reduce = counting_all_reduce
    chained: list[dict] = []
    model, optimizer = build()
    if args.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    config = [
        {"metric_name": "val_loss"},
        {"every_n_steps": 100_000, "filename": "last.pt"},  # never due: only a preemption writes it
    ]
    manager_box: list = []
    armed = arm_writes(args.arm, lambda: manager_box[0]._watch) if args.arm else None
    if args.chain:
        def users_handler(number, frame):
            chained.append({"signal": signal.Signals(number).name, "inside_write": bool(armed and armed["writing"])})
        signal.signal(signal.SIGTERM, users_handler)
    manager = ckptfn.CheckpointManager(directory, config, save_on=SAVE_ON, async_save=args.async_save)
    manager_box.append(manager)
    big = torch.arange(args.big * 2**18, dtype=torch.float32) if args.big else None  # MB of float32
    start = 0
    if args.resume:
        state, _ = ckptfn.load_checkpoint(directory / "last.pt")
        getattr(model, "module", model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        torch.save(payload(model, optimizer, start), directory / f"resumed{rank}.pt")
    events = []
    step = start
    print("ready", flush=True)
    for step in range(start + 1, args.steps + 1):
        loss = train_step(model, optimizer, step, rank)
        if args.world > 1:  # decide on the mean loss, as a real run would
            value = torch.tensor([loss])
            all_reduce(value)
            loss = value.item() / args.world
        state = payload(model, optimizer, step, big)
        if args.mode == "update" or step % args.every == 0:
            paths = manager.update({"val_loss": loss}, state, epoch=0, global_step=step)
            stopped = bool(manager.preempted)
        else:
            paths = []
            stopped = manager.check_preemption(state, 0, global_step=step)
        if armed is not None:
            complete = [ckptfn.verify_checkpoint(path, level="full").ok for path in paths]
            events.append({"step": step, "paths": [p.name for p in paths], "complete": complete,
                           "pending": list(manager._watch.pending), "chained": len(chained), "stopped": stopped})
        print(f"step {step}", flush=True)
        if stopped:
            break
        time.sleep(args.pause)
    record = manager.preempted
    manager.close()
    torch.save(payload(model, optimizer, step), directory / f"final{rank}.pt")
    result = {
        "rank": rank,
        "stopped_at": step,
        "preempted": None if record is None else {
            "signals": list(record.signals), "epoch": record.epoch, "global_step": record.global_step,
            "paths": [p.name for p in record.paths],
        },
        "creates": creates["count"],
        "agreements": agreements["count"],
        "events": events,
        "chained": chained,
        "handler_restored": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
    }
    if args.world > 1:
        torch.distributed.destroy_process_group()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())


# --- workers for tests/distributed/harness.run_ranks (forked, in an initialized gloo group) ----------


def mismatched_save_on(rank: int, world: int, out: str) -> str:
    """Rank 1 alone passes save_on: every rank must raise the same ConfigError, none may hang."""
    try:
        ckptfn.CheckpointManager(out, [{"every_n_epochs": 1}], save_on="SIGUSR1" if rank == 1 else None)
    except ckptfn.ConfigError as error:
        return str(error)
    return "built"
