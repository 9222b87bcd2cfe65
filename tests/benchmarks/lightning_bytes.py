"""Bytes written by Lightning's ``ModelCheckpoint`` x 3 against one ckptfn ``Checkpointing``, measured.

    python tests/benchmarks/lightning_bytes.py [--epochs N] [--dir DIR] [--write-readme]

A small regressor (random data, CPU, no downloads) is trained for ``--epochs`` epochs
(default 6), logging ``val_loss``, ``val_mae`` and ``val_r`` (the correlation of
prediction and target), three times, each ``fit`` in a fresh Python process:

- baseline: no checkpointing at all (``enable_checkpointing=False``);
- setup A: three ``ModelCheckpoint`` callbacks (``val_loss`` min, ``val_mae`` min,
  ``val_r`` max with ``save_last=True``);
- setup B: one ``ckptfn.lightning.Checkpointing`` with the same three metrics and
  ``ckptfn.Every(1, filename="last.ckpt")``.

Each process reads ``wchar`` of ``/proc/self/io`` (bytes passed to write calls of any
kind) just before and just after ``fit``. A setup's bytes are its difference minus the
baseline's, divided by the size of one of its checkpoints (its ``last.ckpt``) to give
the checkpoints written. Both setups must find the same best values, or the script
fails. ``--write-readme`` writes the table into the ``lightning-bytes`` region of
README.md (see tests/readme_regions.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make ``tests.benchmarks`` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

REGION = "lightning-bytes"
COLUMNS = ("setup", "bytes written", "one checkpoint (bytes)", "checkpoints written")
SETUPS = {
    "modelcheckpoint": '`ModelCheckpoint` x 3 (`monitor="val_loss"`, `"val_mae"`, `"val_r"` with '
                       '`mode="max", save_last=True`)',
    "ckptfn": 'one `Checkpointing` (the same three metrics + `Every(1, filename="last.ckpt")`)',
}
METRICS = ("val_loss", "val_mae", "val_r")


# --- one fit, in its own process ---------------------------------------------------------------


def child(setup: str, epochs: int, directory: pathlib.Path) -> dict:
    """Train once with ``setup``'s checkpointing into ``directory``; the ``wchar`` of the ``fit`` and the bests."""
    import logging
    import warnings

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    import ckptfn
    from ckptfn.lightning import Checkpointing
    from tests.benchmarks.measure import io_counters

    warnings.simplefilter("ignore")  # nothing but checkpoints should be written during fit,
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # after the import, which sets INFO
    torch.set_num_threads(1)

    class Regressor(L.LightningModule):
        def __init__(self, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            prediction = self.net(x)
            error = prediction - y
            r = torch.corrcoef(torch.cat([prediction, y], dim=1).T)[0, 1]
            self.log_dict({"val_loss": error.pow(2).mean(), "val_mae": error.abs().mean(), "val_r": r})

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(256, 1)
    train = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32)
    val = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64)

    callbacks: list = []
    if setup == "modelcheckpoint":
        callbacks = [
            ModelCheckpoint(directory, filename="best_loss", monitor="val_loss", mode="min"),
            ModelCheckpoint(directory, filename="best_mae", monitor="val_mae", mode="min"),
            ModelCheckpoint(directory, filename="best_r", monitor="val_r", mode="max", save_last=True),
        ]
    elif setup == "ckptfn":
        callbacks = [Checkpointing([
            {"metric_name": "val_loss", "mode": "min", "filename": "best_loss.ckpt"},
            {"metric_name": "val_mae", "mode": "min", "filename": "best_mae.ckpt"},
            {"metric_name": "val_r", "mode": "max", "filename": "best_r.ckpt"},
            ckptfn.Every(1, filename="last.ckpt"),
        ], dirpath=directory)]
    elif setup != "baseline":
        raise ValueError(f"unknown setup {setup!r}")
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks, enable_checkpointing=setup != "baseline", logger=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    model = Regressor()
    before = io_counters()["wchar"]
    trainer.fit(model, train, val)
    wchar = io_counters()["wchar"] - before
    if setup == "modelcheckpoint":
        bests = {callback.monitor: float(callback.best_model_score) for callback in callbacks}
    elif setup == "ckptfn":
        names = {"best_loss.ckpt": "val_loss", "best_mae.ckpt": "val_mae", "best_r.ckpt": "val_r"}
        bests = {names[name]: float(value) for name, value in callbacks[0].best_values.items()}
    else:
        bests = {}
    last = directory / "last.ckpt"
    return {
        "setup": setup,
        "wchar": wchar,
        "checkpoint_size": last.stat().st_size if last.exists() else 0,
        "bests": bests,
        "files": sorted(path.name for path in directory.iterdir()),
        "versions": {"ckptfn": ckptfn.__version__, "lightning": L.__version__, "torch": torch.__version__},
    }


def run_fits(epochs: int, parent: pathlib.Path) -> dict[str, dict]:
    """The baseline and both setups, each in a fresh interpreter (run side by side: separate processes
    have separate counters)."""
    script = pathlib.Path(__file__).resolve()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no .pyc written during fit
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(script.parents[2]), env.get("PYTHONPATH")]))
    processes = {}
    for setup in ("baseline", *SETUPS):
        directory = parent / setup
        directory.mkdir()
        command = [sys.executable, str(script), "--child", setup, "--epochs", str(epochs), "--dir", str(directory)]
        processes[setup] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)
    results = {}
    for setup, process in processes.items():
        out, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"the {setup} fit failed ({process.returncode}):\n{err[-4000:]}")
        results[setup] = json.loads((parent / setup / "result.json").read_text())
    return results


# --- the table ---------------------------------------------------------------------------------


def checkpoints(result: dict, baseline: dict) -> float:
    return (result["wchar"] - baseline["wchar"]) / result["checkpoint_size"]


def render(results: dict[str, dict]) -> str:
    """One Markdown table: each setup's bytes beyond the baseline, its checkpoint size, and their ratio."""
    baseline = results["baseline"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|"]
    for setup, label in SETUPS.items():
        result = results[setup]
        written = result["wchar"] - baseline["wchar"]
        lines.append(f"| {label} | {written:,} | {result['checkpoint_size']:,} | "
                     f"{checkpoints(result, baseline):.2f} |")
    return "\n".join(lines)


def same_bests(results: dict[str, dict]) -> bool:
    first, second = (results[setup]["bests"] for setup in SETUPS)
    return set(first) == set(METRICS) and first == second


def facts(results: dict[str, dict], epochs: int) -> str:
    """The note's line: versions, what was trained, how it was measured, the sizes and the bests."""
    versions = results["ckptfn"]["versions"]
    baseline = results["baseline"]["wchar"]
    bests = ", ".join(f"{name} {results['ckptfn']['bests'][name]:.4f}" for name in METRICS)
    sizes = ", ".join(f"{name} {results[setup]['checkpoint_size']:,}"
                      for name, setup in zip(("`ModelCheckpoint`", "`Checkpointing`"), SETUPS))
    agree = "Both setups found the same bests" if same_bests(results) else "THE SETUPS FOUND DIFFERENT BESTS"
    return (
        f"ckptfn {versions['ckptfn']}, Lightning {versions['lightning']}, torch {versions['torch']}, Python "
        f"{platform.python_version()}, CPU: {epochs} epochs of a small regressor (4-16-1 MLP, 192 random samples), "
        f"each `fit` in a fresh process; bytes written = `wchar` of `/proc/self/io` just before and after `fit`, "
        f"minus that of the same `fit` without checkpointing ({baseline:,} bytes); one checkpoint = the size of "
        f"the setup's final `last.ckpt` ({sizes} bytes; the checkpoints of other epochs differ by up to a few "
        f"percent, as their metadata does, so the ratios are not whole numbers). {agree}: {bests}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each fit (default 6)")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp directory)")
    parser.add_argument("--write-readme", action="store_true", help=f"also write the table into README.md ({REGION})")
    parser.add_argument("--child", choices=("baseline", *SETUPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        directory = pathlib.Path(args.dir)
        result = child(args.child, args.epochs, directory)
        (directory / "result.json").write_text(json.dumps(result))
        return 0
    started = time.monotonic()
    parent = pathlib.Path(tempfile.mkdtemp(prefix="ckptfn-lightning-bytes-", dir=args.dir))
    try:
        results = run_fits(args.epochs, parent)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    note = facts(results, args.epochs)
    table = render(results)
    print(note)
    print()
    print(table)
    for setup in SETUPS:
        print(f"{setup}: files left {results[setup]['files']}", file=sys.stderr)
    print(f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    if not same_bests(results):
        print(f"error: the setups found different bests: {[results[s]['bests'] for s in SETUPS]}", file=sys.stderr)
        return 1
    if args.write_readme:
        from tests.readme_regions import measured_note, write_region

        command = " ".join(["python tests/benchmarks/lightning_bytes.py", *(sys.argv[1:] if argv is None else argv)])
        write_region(REGION, measured_note(command, note) + "\n\n" + table)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
