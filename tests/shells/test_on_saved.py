"""The ``on_saved`` hook: every committed name is told once, with plain data; nothing else is."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import ckptfn
from ckptfn.core.events import Saved
from tests.faults import FailingFS
from tests.shells.test_background import use_fs

CONFIG = [
    ckptfn.Strategy("val_loss"),
    ckptfn.Strategy("acc", mode="max", top_k=2),
    ckptfn.Every(n_steps=20, filename="last.pt"),
]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_every_committed_name_is_reported_once_with_its_numbers(tmp_path, async_save):
    events: list[Saved] = []
    with ckptfn.CheckpointManager(tmp_path, CONFIG, on_saved=events.append, async_save=async_save) as manager:
        for step, (loss, acc) in enumerate([(0.5, 0.7), (0.6, 0.8), (0.4, 0.75)], start=1):
            manager.update({"val_loss": loss, "acc": acc}, {"w": torch.full((4,), step)}, 0, global_step=20 * step)
    got = [(e.name, e.kind, e.value, e.previous, e.global_step) for e in events]
    assert got == [
        ("best_val_loss.pt", "best", 0.5, None, 20), ("best_acc.pt", "best", 0.7, None, 20), ("last.pt", "periodic", None, None, 20),
        ("best_acc.pt", "best", 0.8, 0.7, 40), ("last.pt", "periodic", None, None, 40),
        ("best_val_loss.pt", "best", 0.4, 0.5, 60), ("best_acc-epoch=0-step=60.pt", "top_k", 0.75, 0.7, 60),  # previous: the k-th best it beat
        ("last.pt", "periodic", None, None, 60),
    ]
    demoting = events[3]
    assert demoting.aside == "best_acc-epoch=0-step=20.pt"
    entering = events[6]
    assert entering.removed == ("best_acc-epoch=0-step=20.pt",)  # 0.7 left the top 2
    for event in events[-3:]:  # the last snapshot: three names, one file, its size once
        assert event.paths == tuple(e.path for e in events[-3:])
        assert event.bytes == os.stat(event.path).st_size > 0
        assert os.path.samefile(event.path, events[-1].path)
    assert all(isinstance(value, (str, int, float, type(None), list)) for value in events[0].to_dict().values())


def test_a_failed_write_is_not_reported_and_a_failing_hook_only_warns(tmp_path, monkeypatch, caplog):
    events = []

    def broken(event):
        raise RuntimeError("tracker is down")

    manager = ckptfn.CheckpointManager(tmp_path, CONFIG[:1], on_saved=[events.append, broken])
    use_fs(monkeypatch, FailingFS("fsync"))
    with pytest.raises(ckptfn.CheckpointWriteError):
        manager.update({"val_loss": 0.5}, {}, 0)
    assert events == []
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="ckptfn"):
        assert [p.name for p in manager.update({"val_loss": 0.5}, {}, 1)] == ["best_val_loss.pt"]
    assert [e.name for e in events] == ["best_val_loss.pt"]
    assert "the on_saved hook" in caplog.text and "tracker is down" in caplog.text


def test_on_saved_must_be_callables(tmp_path):
    with pytest.raises(TypeError, match=r"on_saved\[1\]: expected a callable, got str 'wandb'"):
        ckptfn.CheckpointManager(tmp_path, CONFIG[:1], on_saved=[print, "wandb"])
