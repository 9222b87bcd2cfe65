"""Preemption (``save_on``) with ``ckptfn.integrations.lightning.Checkpointing`` and a real
``lightning.Trainer``: a real signal (``os.kill`` of this process, from a callback at a known
step, or of one DDP rank) stops ``fit`` at the next safe point with a complete last file
that resumes exactly; without ``save_on`` nothing is intercepted; the handlers are put back."""

from __future__ import annotations

import copy
import json
import os
import signal
import warnings

import pytest
import torch

lightning = pytest.importorskip("lightning", reason="the Lightning tests need the 'lightning' extra (pip install 'ckptfn[test]')")
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

import ckptfn  # noqa: E402
from ckptfn import Every, Strategy  # noqa: E402
from ckptfn.integrations.lightning import Checkpointing  # noqa: E402
from tests.integrations.test_lightning import TinyModel, make_model, trainer  # noqa: E402
from tests.integrations.test_lightning_steps import long_epochs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")

STEPS_PER_EPOCH = 10
CONFIG = [Strategy("val_loss", filename="best_loss.ckpt"), Every(1, filename="last.ckpt")]


@pytest.fixture(autouse=True)
def default_handlers():
    """Every test starts and ends with the default SIGUSR1/SIGTERM handlers (a leak fails the test)."""
    for number in (signal.SIGUSR1, signal.SIGTERM):
        assert signal.getsignal(number) == signal.SIG_DFL
    yield
    leaked = [number for number in (signal.SIGUSR1, signal.SIGTERM) if signal.getsignal(number) != signal.SIG_DFL]
    for number in leaked:
        signal.signal(number, signal.SIG_DFL)
    assert not leaked, f"handlers left installed: {leaked}"


class Resumable:
    """A train loader that Lightning resumes mid-epoch (it has ``state_dict``/``load_state_dict``,
    which go into the checkpoint's loops): the batches of an epoch not trained yet, in order."""

    def __init__(self, loader) -> None:
        self.loader, self.given, self.skip = loader, 0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        self.given = skip
        for index, batch in enumerate(self.loader):
            if index >= skip:
                self.given += 1
                yield batch

    def state_dict(self) -> dict:
        return {"given": self.given}

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["given"]


class Kill(lightning.Callback):
    """Send ``number`` to this process once, at the start of the batch after ``at`` optimizer steps
    (or, with ``in_validation``, during the first validation after that step)."""

    def __init__(self, at: int, number: int = signal.SIGUSR1, *, in_validation: bool = False) -> None:
        self.at, self.number, self.in_validation, self.sent = at, number, in_validation, False

    def _send(self, trainer) -> None:
        if not self.sent and trainer.global_step >= self.at and not trainer.sanity_checking:
            self.sent = True
            os.kill(os.getpid(), self.number)  # Python runs the handler before the next line

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.in_validation:
            self._send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.in_validation:
            self._send(trainer)


class Snapshot(lightning.Callback):
    """Where each fit started and ended: epoch, global step, weights, optimizer state, handlers."""

    def __init__(self) -> None:
        self.start = self.end = None
        self.handlers_in_training = None

    @staticmethod
    def _now(trainer, pl_module) -> dict:
        return {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        }

    def on_train_start(self, trainer, pl_module):
        self.start = self._now(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.handlers_in_training = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))

    def on_train_end(self, trainer, pl_module):
        self.end = self._now(trainer, pl_module)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_signal_stops_fit_at_the_next_step_with_a_last_file_that_resumes_exactly(tmp_path):
    train, val = long_epochs(STEPS_PER_EPOCH)
    callback, stopped = Checkpointing(CONFIG, dirpath=tmp_path, save_on=("SIGTERM", "SIGUSR1")), Snapshot()
    fit = trainer(3, [callback, Kill(13), stopped])
    fit.fit(make_model(), Resumable(train), val)  # returns: the stop is a clean one
    record = callback.preempted
    assert record and record.signals == ("SIGUSR1",) and (record.epoch, record.global_step) == (1, 14)
    assert record.paths == (tmp_path / "last.ckpt",) and stopped.end["global_step"] == 14  # mid-epoch 1
    assert stopped.handlers_in_training[1].__name__ == "record_signal"  # ours while training ...
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # ... and the previous one after fit
    assert ckptfn.verify_checkpoint(tmp_path / "last.ckpt", level="full").ok
    metadata = ckptfn.read_metadata(tmp_path / "last.ckpt")
    assert (metadata["epoch"], metadata["global_step"]) == (1, 14)
    assert ckptfn.read_metadata(tmp_path / "best_loss.ckpt")["epoch"] == 0  # the metric strategy untouched
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert same(raw["state_dict"], stopped.end["weights"])  # the state the run stopped with
    # a new process resumes from it: the same position, weights and optimizer state ...
    resumed, start = Checkpointing(CONFIG, dirpath=tmp_path, save_on="SIGTERM"), Snapshot()
    trainer(3, [resumed, start]).fit(make_model(), Resumable(train), val, ckpt_path="last")
    assert (start.start["epoch"], start.start["global_step"]) == (1, 14) and resumed.preempted is None
    assert same(start.start["weights"], stopped.end["weights"])
    assert same(start.start["optimizer"], stopped.end["optimizer"])
    # ... and carries on as if never stopped
    whole = Snapshot()
    trainer(3, [whole], enable_checkpointing=False).fit(make_model(), Resumable(train), val)  # no files of its own
    assert start.end["global_step"] == whole.end["global_step"] == 30
    assert same(start.end["weights"], whole.end["weights"])
    assert resumed.state.bests == ckptfn.restore_from_directory(resumed.config, tmp_path).bests


def test_sigterm_during_a_validation_is_saved_at_its_end_with_what_improved_in_one_write(tmp_path):
    """Lightning's own SIGTERM handling would end fit with SIGTERMException in the middle of the
    validation; with save_on the validation ends, its decision is a preempted one."""
    train, val = long_epochs(STEPS_PER_EPOCH)
    events = []
    callback = Checkpointing([Strategy("val_loss", filename="best_loss.ckpt"), Every(5, filename="last.ckpt")],
                             dirpath=tmp_path, save_on="SIGTERM", on_saved=events.append)
    fit = trainer(3, [callback, Kill(STEPS_PER_EPOCH + 1, signal.SIGTERM, in_validation=True)], val_check_interval=0.5)
    fit.fit(make_model(), train, long_epochs(20)[1])  # two validation batches: the signal comes in the first
    record = callback.preempted
    assert record.signals == ("SIGTERM",) and (record.epoch, record.global_step) == (1, 15) and fit.global_step == 15
    assert {event.global_step for event in events if event.name == "last.ckpt"} == {15}  # Every(5) alone: never
    at_stop = [event for event in events if event.global_step == 15]
    assert len({event.path for event in at_stop}) == len(at_stop) and len({e.bytes for e in at_stop}) == 1
    assert ckptfn.read_metadata(tmp_path / "last.ckpt")["global_step"] == 15
    assert not fit.received_sigterm  # Lightning never saw it


def test_save_on_comes_from_the_config_too(tmp_path):
    train, val = long_epochs(STEPS_PER_EPOCH)
    config = ckptfn.Config.from_mapping({"save_on": ["SIGUSR1"], "strategies": [{"every_n_epochs": 1, "filename": "last.ckpt"}]})
    callback = Checkpointing(config, dirpath=tmp_path, save_on=signal.SIGTERM)
    assert callback.config.save_on == ("SIGUSR1", "SIGTERM")
    trainer(2, [callback, Kill(4)]).fit(make_model(), train, val)
    assert callback.preempted.signals == ("SIGUSR1",) and callback.preempted.global_step == 5


def test_without_save_on_signals_are_not_intercepted(tmp_path):
    train, val = long_epochs(STEPS_PER_EPOCH)
    heard = []
    signal.signal(signal.SIGUSR1, lambda number, frame: heard.append(number))
    try:
        callback, end = Checkpointing(CONFIG, dirpath=tmp_path), Snapshot()
        trainer(2, [callback, Kill(3), end]).fit(make_model(), train, val)
        assert heard == [signal.SIGUSR1] and callback.preempted is None and end.end["global_step"] == 20
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    # SIGTERM stays Lightning's: its SIGTERMException ends fit in the middle of the next validation
    callback = Checkpointing(CONFIG, dirpath=tmp_path / "term")
    with warnings.catch_warnings(), pytest.raises(SIGTERMException):
        warnings.simplefilter("ignore")
        trainer(3, [callback, Kill(3, signal.SIGTERM)]).fit(make_model(), train, long_epochs(20)[1])
    assert callback.preempted is None and not (tmp_path / "term").exists()  # nothing saved


def test_the_handlers_from_before_fit_are_chained_and_back_after_it_even_when_it_fails(tmp_path):
    train, val = long_epochs(STEPS_PER_EPOCH)
    heard = []
    mine = lambda number, frame: heard.append(number)  # noqa: E731
    signal.signal(signal.SIGUSR1, mine)
    try:
        callback, seen = Checkpointing(CONFIG, dirpath=tmp_path, save_on="SIGUSR1"), Snapshot()
        trainer(1, [callback, Kill(2), seen]).fit(make_model(), train, val)
        assert callback.preempted.global_step == 3 and heard == [signal.SIGUSR1]  # recorded, then chained to mine
        assert signal.getsignal(signal.SIGUSR1) is mine and seen.handlers_in_training[1] is not mine

        class Failing(TinyModel):
            def training_step(self, batch, index):
                if self.global_step == 4:
                    raise RuntimeError("boom")
                return super().training_step(batch, index)

        torch.manual_seed(0)
        with pytest.raises(RuntimeError, match="boom"):
            trainer(1, [Checkpointing(CONFIG, dirpath=tmp_path / "failed", save_on="SIGUSR1")]).fit(Failing(), train, val)
        assert signal.getsignal(signal.SIGUSR1) is mine
        os.kill(os.getpid(), signal.SIGUSR1)
        assert heard == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_where_lightning_does_not_say_which_handlers_came_before_fit_none_is_chained(tmp_path, monkeypatch):
    from ckptfn.integrations import lightning_internals

    monkeypatch.setattr(lightning_internals, "handlers_before_fit", lambda trainer, numbers: None)
    train, val = long_epochs(STEPS_PER_EPOCH)
    callback = Checkpointing(CONFIG, dirpath=tmp_path, save_on="SIGTERM")
    fit = trainer(2, [callback, Kill(2, signal.SIGTERM)])
    fit.fit(make_model(), train, val)
    assert callback.preempted.global_step == 3 and not fit.received_sigterm  # Lightning's handler not called
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_with_gradient_accumulation_the_save_waits_for_the_optimizer_step(tmp_path):
    train, val = long_epochs(STEPS_PER_EPOCH)
    callback, end = Checkpointing(CONFIG, dirpath=tmp_path, save_on="SIGUSR1"), Snapshot()

    class KillOddBatch(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 3:  # the second half of an accumulation: no optimizer step after batch 2
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer(1, [callback, KillOddBatch(), end], accumulate_grad_batches=2).fit(make_model(), train, val)
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert callback.preempted.global_step == 2 == raw["global_step"] == end.end["global_step"]
    assert raw["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 4  # batches 0-3


class RankRecord(lightning.Callback):
    def __init__(self, directory, at: int) -> None:
        self.directory, self.at = directory, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)  # rank 1 alone is told

    def on_train_end(self, trainer, pl_module):
        record = trainer.checkpoint_callback.preempted
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "global_step": trainer.global_step, "signals": list(record.signals), "at": record.global_step,
            "paths": [str(path) for path in record.paths],
        }))


def test_under_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    train, val = long_epochs(STEPS_PER_EPOCH)
    callback = Checkpointing(CONFIG, dirpath=tmp_path / "run", save_on="SIGUSR1")
    torch.manual_seed(0)
    trainer(3, [callback, RankRecord(tmp_path, 6)], strategy="ddp_fork", devices=2).fit(TinyModel(), train, val)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["signals"] for r in ranks] == [[], ["SIGUSR1"]]  # rank 0 stopped for rank 1's signal
    assert {r["global_step"] for r in ranks} == {r["at"] for r in ranks} == {7}
    assert ranks[0]["paths"] == ranks[1]["paths"] == [str(tmp_path / "run" / "last.ckpt")]
    assert ckptfn.read_metadata(tmp_path / "run" / "last.ckpt")["global_step"] == 7
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
