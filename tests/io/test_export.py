"""safetensors export: the weights of a checkpoint, bit-identical, for inference."""

from __future__ import annotations

import json
import os

import pytest
import torch

safetensors = pytest.importorskip("safetensors", reason="needs the safetensors extra")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import ckptfn  # noqa: E402
from ckptfn import kit  # noqa: E402
from ckptfn.io.export import export_safetensors  # noqa: E402


class Tied(torch.nn.Module):
    """A tiny language-model shape whose output layer shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.block = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU(), torch.nn.LayerNorm(6))
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens)))


def saved_best(directory, model, **extra):
    optimizer = torch.optim.Adam(model.parameters())
    example = torch.arange(5) if isinstance(model, Tied) else torch.randn(5, 3)
    model(example).sum().backward()
    optimizer.step()
    manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val/loss"))
    manager.update({"val/loss": 0.25}, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}, 3,
                   global_step=120)
    return directory / "best_val_loss.pt"


def test_round_trip_gives_bit_identical_outputs_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    path = saved_best(tmp_path, model)
    out = export_safetensors(path, tmp_path / "model.safetensors")
    fresh = Tied()
    fresh.load_state_dict(load_file(out), strict=True)
    assert fresh.head.weight is fresh.embed.weight  # the tie is the model's, the values the file's
    tokens = torch.tensor([[1, 4, 9, 2, 10]])
    assert torch.equal(fresh(tokens), model(tokens))
    with safe_open(out, "pt") as file:
        header = file.metadata()
        names = sorted(file.keys())
    assert names == sorted(model.state_dict())
    assert header["ckptfn.epoch"] == "3" and header["ckptfn.global_step"] == "120"
    assert header["ckptfn.metric"] == "val/loss" and header["ckptfn.value"] == "0.25"
    assert json.loads(header["ckptfn.saves"])[0]["filename"] == "best_val_loss.pt"


def test_the_key_picks_nested_weights_and_bad_keys_name_the_entries(tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = {"inner": torch.nn.Linear(3, 2).state_dict()}
    path = saved_best(tmp_path, model, ema=ema)
    out = export_safetensors(path, tmp_path / "ema.safetensors", key="ema")
    assert sorted(load_file(out)) == ["inner.bias", "inner.weight"]
    with pytest.raises(ckptfn.PayloadError, match=r"no entry 'emma' \(entries: model, optimizer, ema\)"):
        export_safetensors(path, tmp_path / "x.safetensors", key="emma")
    with pytest.raises(ckptfn.PayloadError, match=r"\['optimizer'\]\['state'\]: keys must be str to name tensors, got int 0"):
        export_safetensors(path, tmp_path / "x.safetensors", key="optimizer")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_foreign_file_is_refused_and_an_existing_export_is_replaced_whole(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ckptfn.CheckpointError, match="notes.pt"):
        export_safetensors(tmp_path / "notes.pt", tmp_path / "x.safetensors")
    model = torch.nn.Linear(3, 2)
    path = saved_best(tmp_path / "run", model)
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"an older export")
    export_safetensors(path, target)
    assert torch.equal(load_file(target)["weight"], model.weight.detach())
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary left behind


def test_a_lightning_layout_file_exports_its_state_dict(tmp_path):
    model = torch.nn.Linear(3, 2)
    snapshot = kit.Snapshot([kit.Target("best.ckpt")], {"format": "ckptfn/1", "epoch": 1, "saves": [],
                                                                     "layout": "flat"})
    written = kit.write(tmp_path, snapshot, {"state_dict": model.state_dict(), "epoch": 1, "global_step": 8})
    written.raise_error()
    out = export_safetensors(tmp_path / "best.ckpt", tmp_path / "m.safetensors")
    assert torch.equal(load_file(out)["bias"], model.bias.detach())
