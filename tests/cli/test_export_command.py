"""``ckptfn export``: the weights of a checkpoint as safetensors, one line on every mistake."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("safetensors", reason="needs the safetensors extra")
from safetensors.torch import load_file  # noqa: E402

import ckptfn  # noqa: E402
from ckptfn.cli.main import main  # noqa: E402


def test_export_writes_the_weights_and_says_where(tmp_path, capsys):
    model = torch.nn.Linear(3, 2)
    ckptfn.CheckpointManager(tmp_path, ckptfn.Strategy("val_loss")).update({"val_loss": 0.5}, {"model": model.state_dict()}, 2)
    assert main(["export", str(tmp_path / "best_val_loss.pt"), "--to", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exported ") and "m.safetensors" in out
    assert torch.equal(load_file(tmp_path / "m.safetensors")["weight"], model.weight.detach())


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.pt", "--to", "x.safetensors"], "missing.pt: no such file or directory"),
        (["best_val_loss.pt", "--to", "x.safetensors", "--key", "nope"], "no entry 'nope' (entries: model)"),
        (["notes.pt", "--to", "x.safetensors"], "not a ckptfn checkpoint"),
    ],
)
def test_mistakes_are_one_line_with_status_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    ckptfn.CheckpointManager(tmp_path, ckptfn.Strategy("val_loss")).update({"val_loss": 0.5}, {"model": {"w": torch.zeros(1)}}, 0)
    (tmp_path / "notes.pt").write_text("hello")
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckptfn export: error: ") and message in err[0], err
    assert not (tmp_path / "x.safetensors").exists()
