"""``ckptfn inspect`` of real run directories: snapshots under several names, steps, top-k members,
plain Lightning checkpoints, files that are not checkpoints, hostile files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

import ckptfn
from ckptfn.cli.errors import human_size
from ckptfn.cli.main import main

from tests.cli.tables import footer, table_rows


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cells(row: str) -> list[str]:
    """The cells of a table row (columns are at least two spaces apart)."""
    return re.split(r"\s{2,}", row.strip())


@pytest.fixture
def top_k_run(tmp_path):
    """The issue's history: val_acc 0.50, 0.45, 0.60, 0.55, 0.58 with top_k=3, a loss, and last.pt every 20 steps."""
    directory = tmp_path / "run"
    manager = ckptfn.CheckpointManager(directory, [
        ckptfn.Strategy("val_acc", mode="max", top_k=3), ckptfn.Strategy("val_loss"),
        ckptfn.Every(n_steps=20, filename="last.pt")])
    for epoch, (acc, loss) in enumerate([(0.50, 1.0), (0.45, 0.9), (0.60, 0.95), (0.55, 0.8), (0.58, 0.85)]):
        manager.update({"val_acc": acc, "val_loss": loss, "lr": 0.1 / (epoch + 1)}, {"w": torch.ones(256)},
                       epoch=epoch, global_step=20 * (epoch + 1))
    return directory


def test_names_of_one_snapshot_are_listed_together_with_the_size_once(top_k_run, capsys):
    code, out, _ = run(capsys, "inspect", top_k_run)
    rows = [cells(row) for row in table_rows(out)]
    assert code == 0 and [row[0] for row in rows] == [
        "best_val_acc-epoch=3-step=80.pt", "= best_val_loss.pt",
        "best_val_acc-epoch=4-step=100.pt", "= last.pt",
        "best_val_acc.pt"]
    assert rows[0][1:4] == ["3", "80", "val_acc=0.55 (top-3 #3)"] and rows[1][1:] == ["val_loss=0.8"]
    assert rows[2][1:4] == ["4", "100", "val_acc=0.58 (top-3 #2)"] and rows[3][1:] == ["every 20 steps"]
    assert rows[4][1:4] == ["2", "60", "val_acc=0.6 (top-3 #1)"]  # its last.pt has moved on: not listed
    inodes = {}
    for path in top_k_run.iterdir():
        stat = path.stat()
        inodes[(stat.st_dev, stat.st_ino)] = stat.st_size
    assert len(inodes) == 3 and sum(row[-1].endswith("KiB") for row in rows) == 3  # the size once per snapshot
    assert footer(out) == f"5 names, 3 snapshots, {human_size(sum(inodes.values()))} on disk"
    code, out, _ = run(capsys, "inspect", "--json", top_k_run)
    listed = json.loads(out)
    assert [r["snapshot"] for r in listed] == [1, 1, 2, 2, 3] and [r["global_step"] for r in listed] == [80, 80, 100, 100, 60]


def test_the_other_metrics_only_with_wide(top_k_run, capsys):
    _, out, _ = run(capsys, "inspect", top_k_run / "best_val_acc.pt")
    assert "lr=" not in out and "val_loss" not in out
    _, out, _ = run(capsys, "inspect", "--wide", top_k_run / "best_val_acc.pt")
    header, _, row = out.splitlines()
    assert "other metrics" in header and "val_loss=0.95, lr=0.03333" in row


def test_a_file_alone_shows_every_strategy_that_chose_it(top_k_run, capsys):
    _, out, _ = run(capsys, "inspect", top_k_run / "last.pt")
    (row,) = table_rows(out)
    assert cells(row)[:4] == ["last.pt", "4", "100", "val_acc=0.58 (top-3), every 20 steps"] and footer(out) == ""


def test_a_directory_lists_only_checkpoints_and_counts_the_rest(tmp_path, capsys):
    manager = ckptfn.CheckpointManager(tmp_path, ckptfn.Strategy("val_loss", filename="model"))  # no suffix
    manager.update({"val_loss": 0.5}, {"w": torch.ones(2)}, epoch=0)
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pth")  # a plain torch file: listed, with why
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "hparams.yaml").write_text("lr: 0.1\n")
    shutil.make_archive(str(tmp_path / "data"), "zip", root_dir=tmp_path, base_dir="notes.txt")  # a zip, not ours
    (tmp_path / "logs").mkdir()
    code, out, _ = run(capsys, "inspect", tmp_path)
    rows = table_rows(out)
    assert code == 0 and [cells(row)[0] for row in rows] == ["model", "weights.pth"]
    assert cells(rows[0])[1:4] == ["0", "-", "val_loss=0.5"]
    assert "unreadable: not a ckptfn checkpoint (a torch.save file without ckptfn metadata)" in rows[1]
    assert footer(out).endswith("; 4 other entries skipped (not checkpoints)")


def lightning_checkpoint(epoch: int = 2, global_step: int = 50) -> dict:
    """The top level of a ``trainer.save_checkpoint`` file, as ModelCheckpoint writes it."""
    path = f"/runs/lightning_logs/version_0/checkpoints/epoch={epoch}-step={global_step}.ckpt"
    return {
        "epoch": epoch, "global_step": global_step, "pytorch-lightning_version": "2.6.6",
        "state_dict": {"layer.weight": torch.ones(3, 4)},
        "loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": global_step}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "monitor": "val_loss", "best_model_score": torch.tensor(0.25), "best_model_path": path,
            "best_k_models": {path: torch.tensor(0.25)}, "last_model_path": ""}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "lr_schedulers": [],
    }


def test_a_plain_lightning_checkpoint_shows_its_epoch_and_step(tmp_path, capsys):
    torch.save(lightning_checkpoint(), tmp_path / "epoch=2-step=50.ckpt")
    torch.save({**lightning_checkpoint(3, 75), "callbacks": {}}, tmp_path / "last.ckpt")
    code, out, _ = run(capsys, "inspect", tmp_path)
    rows = [cells(row) for row in table_rows(out)]
    assert code == 0 and rows[0][:4] == ["epoch=2-step=50.ckpt", "2", "50",
                                         "ModelCheckpoint(monitor=val_loss): best; Lightning 2.6.6"]
    assert rows[1][:4] == ["last.ckpt", "3", "75", "Lightning 2.6.6"]
    code, out, _ = run(capsys, "inspect", "--json", tmp_path / "last.ckpt")
    (row,) = json.loads(out)
    assert (row["kind"], row["epoch"], row["global_step"], row["error"]) == ("lightning", 3, 75, None)


def test_inspecting_lightning_files_does_not_import_torch(tmp_path):
    torch.save(lightning_checkpoint(), tmp_path / "epoch=2-step=50.ckpt")
    script = (f"import sys\nfrom ckptfn.cli.main import main\nassert main(['inspect', {str(tmp_path)!r}]) == 0\n"
              "assert 'torch' not in sys.modules, 'inspect imported torch'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "epoch=2-step=50.ckpt  2      50" in result.stdout


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # Lightning's own, from torch's pytree
def test_a_real_lightning_trainer_checkpoint(tmp_path, capsys):
    import lightning  # a test extra

    class Model(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, _index):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, _index):
            self.log("val_loss", self.layer(batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    checkpoints = tmp_path / "checkpoints"
    trainer = lightning.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(
            dirpath=checkpoints, monitor="val_loss", save_top_k=2, save_last=True)])
    trainer.fit(Model(), data, data)
    code, out, _ = run(capsys, "inspect", checkpoints)
    rows = {cells(row)[0]: cells(row) for row in table_rows(out)}
    assert code == 0 and set(rows) == {"epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"}, out
    assert rows["epoch=1-step=4.ckpt"][1:3] == ["1", "4"] and "ModelCheckpoint(monitor=val_loss)" in rows["last.ckpt"][3]
    assert not any("unreadable" in " ".join(row) for row in rows.values())


def test_a_file_without_a_step_shows_a_dash_and_odd_steps_a_question_mark(tmp_path, capsys):
    meta = {"format": "ckptfn/1", "epoch": 3, "timestamp": "2026-01-01T00:00:00+00:00",
            "saves": [{"metric_name": "val_loss", "value": 0.5, "filename": "old.pt"}]}
    torch.save({"state_dict": {}, "metadata": meta}, tmp_path / "old.pt")  # written before global_step existed
    torch.save({"state_dict": {}, "metadata": {**meta, "global_step": "x"}}, tmp_path / "odd.pt")
    _, out, _ = run(capsys, "inspect", tmp_path / "old.pt", tmp_path / "odd.pt")
    rows = {cells(row)[0]: cells(row) for row in table_rows(out)}
    assert rows["old.pt"][1:3] == ["3", "-"] and rows["odd.pt"][1:3] == ["3", "?"]
    assert "global_step: expected an int >= 0, got str 'x'" in rows["odd.pt"][3]


@pytest.mark.parametrize("entry, shown", [
    ({"every_n_epochs": 1}, "every 1 epoch"), ({"every_n_epochs": 5}, "every 5 epochs"),
    ({"every_n_steps": 20}, "every 20 steps"), ({"every_seconds": 1800.0}, "every 1800 seconds"),
    ({"every_seconds": 0.5}, "every 0.5 seconds"), ({"every_n_steps": "20"}, "?"),
])
def test_periodic_entries_of_every_trigger(tmp_path, capsys, entry, shown):
    meta = {"format": "ckptfn/1", "epoch": 0, "global_step": 20, "saves": [{**entry, "filename": "last.pt"}]}
    torch.save({"state_dict": {}, "metadata": meta}, tmp_path / "last.pt")
    _, out, _ = run(capsys, "inspect", tmp_path / "last.pt")
    (row,) = table_rows(out)
    assert cells(row)[3].startswith(shown)


ANSI = "\x1b[2J\x1b[31m"


@pytest.fixture
def hostile_class():
    """A class whose module and name carry ANSI escapes, importable so that pickle can save it."""
    name = f"evil{ANSI}module"
    module = types.ModuleType(name)

    class Net:
        pass

    Net.__module__, Net.__qualname__ = name, "Net\x1b]0;pwned\x07"
    setattr(module, Net.__qualname__, Net)
    sys.modules[name] = module
    yield Net
    del sys.modules[name]


def test_a_hostile_file_never_sends_control_characters_to_the_terminal(tmp_path, capsys, hostile_class):
    torch.save({"model": hostile_class(), "epoch": 3}, tmp_path / "model.pt")  # no ckptfn metadata
    meta = {"format": "ckptfn/1", "epoch": 1, "global_step": 7, "timestamp": "2026" + ANSI,
            "saves": [{"metric_name": "val" + ANSI + "loss", "value": 0.5, "filename": "best.pt"}]}
    torch.save({"state_dict": {"net": hostile_class()}, "metadata": meta}, tmp_path / "best.pt")
    code, out, err = run(capsys, "inspect", tmp_path)
    assert code == 0 and err == ""
    assert all(char == "\n" or char.isprintable() for char in out)
    assert max(len(line) for line in out.splitlines()) < 200  # escaped and cut, not 262 columns of escapes
    rows = {cells(row)[0]: row for row in table_rows(out)}
    assert "unreadable: not a ckptfn checkpoint" in rows["model.pt"] and "evil\\x1b[2J\\x1b[31mmodule" in rows["model.pt"]
    # the metadata is plain, so it is shown; the payload's class is named as torch would refuse it
    assert "val\\x1b[2J\\x1b[31mloss=0.5" in rows["best.pt"] and "torch's weights_only loader refuses it" in rows["best.pt"]
    code, out, _ = run(capsys, "inspect", "--json", tmp_path)
    assert code == 0 and {r["file"] for r in json.loads(out)} == {"best.pt", "model.pt"}


def test_torchs_own_ansi_error_text_is_escaped(tmp_path, capsys, hostile_class):
    # a ckptfn file whose metadata holds the class: torch must judge it, and its message holds "\x1b[1m"
    meta = {"format": "ckptfn/1", "epoch": 1, "saves": [], "odd": hostile_class()}
    torch.save({"state_dict": {}, "metadata": meta}, tmp_path / "odd.pt")
    code, out, _ = run(capsys, "inspect", tmp_path / "odd.pt")
    (row,) = table_rows(out)
    assert code == 0 and "unreadable: cannot be loaded safely" in row and "\x1b" not in out and len(row) < 220


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"ckptfn {ckptfn.__version__}\n"


def test_a_directory_of_links_reads_each_snapshot_once(tmp_path, capsys, monkeypatch):
    torch.save({"state_dict": {}, "metadata": {"format": "ckptfn/1", "epoch": 0, "saves": []}}, tmp_path / "a.pt")
    for index in range(50):
        os.link(tmp_path / "a.pt", tmp_path / f"link_{index:02d}.pt")
    import ckptfn.cli.inspect as inspect_module

    reads = []
    real = inspect_module.peek_file
    monkeypatch.setattr(inspect_module, "peek_file", lambda path: reads.append(path) or real(path))
    code, out, _ = run(capsys, "inspect", tmp_path)
    assert code == 0 and len(table_rows(out)) == 51 and len(reads) == 1
    assert footer(out) == f"51 names, 1 snapshot, {human_size((tmp_path / 'a.pt').stat().st_size)} on disk"
