"""Preemption (``save_on``) with ``ckptfn.integrations.huggingface.Checkpointing`` and a real
``transformers.Trainer`` (tiny GPT-2, CPU, offline): a real signal (``os.kill`` of this process
from a callback at a known step) stops ``train()`` at the next safe point with a complete
``last.pt`` holding the state of that step; without ``save_on`` nothing is intercepted; the
handlers are put back."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: no network, ever

import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the 'huggingface' extra")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate (the 'huggingface' extra)")
from transformers import GPT2LMHeadModel, TrainerCallback, TrainerState  # noqa: E402

import ckptfn  # noqa: E402
import ckptfn.io.write  # noqa: E402
from ckptfn import Every, Strategy  # noqa: E402
from ckptfn.io.write import write_snapshot  # noqa: E402
from tests.faults import FailingFS  # noqa: E402
from ckptfn.integrations.huggingface import Checkpointing  # noqa: E402
from tests.integrations.test_huggingface import FIXED_INPUT, make_trainer, model_config, offline, one_thread  # noqa: E402,F401 - fixtures: autouse here too
from tests.integrations.test_lightning_preemption import default_handlers, same  # noqa: E402, F401

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

CONFIG = [Strategy("eval_accuracy", mode="max"), Every(n_steps=100, filename="last.pt")]  # last.pt: only when preempted


class Kill(TrainerCallback):
    """Send ``number`` to this process once: before the optimizer step after ``at``, or (with
    ``in_evaluation``) during the first evaluation after step ``at``."""

    def __init__(self, at: int, number: int = signal.SIGUSR1, *, in_evaluation: bool = False) -> None:
        self.at, self.number, self.in_evaluation, self.sent = at, number, in_evaluation, False

    def _send(self, state) -> None:
        if not self.sent and state.global_step >= self.at:
            self.sent = True
            os.kill(os.getpid(), self.number)  # Python runs the handler before the next line

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.in_evaluation:
            self._send(state)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.in_evaluation:
            self._send(state)


class End(TrainerCallback):
    """The step and weights ``train()`` ended with, and the handlers installed while it ran."""

    def __init__(self) -> None:
        self.handlers = None

    def on_step_end(self, args, state, control, **kwargs):
        self.handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.global_step, self.epoch = state.global_step, state.epoch
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer = optimizer.state_dict()


def test_a_signal_stops_train_after_the_next_step_with_a_last_file_of_that_step(tmp_path):
    callback, end = Checkpointing(CONFIG, tmp_path / "ckptfn", save_on=("SIGTERM", "SIGUSR1")), End()
    make_trainer(tmp_path, [Kill(6), callback, end], save=False).train()
    record = callback.preempted
    assert record and record.signals == ("SIGUSR1",) and record.global_step == 7 == end.global_step
    assert record.paths == (tmp_path / "ckptfn" / "last.pt",) and end.handlers[1].__name__ == "record_signal"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # put back
    assert ckptfn.verify_checkpoint(tmp_path / "ckptfn" / "last.pt", level="full").ok
    payload, metadata = ckptfn.load_checkpoint(tmp_path / "ckptfn" / "last.pt")
    assert (metadata["epoch"], metadata["global_step"]) == (0, 7)
    assert TrainerState(**payload["trainer_state"]).global_step == 7
    assert same(payload["model"], end.weights) and same(payload["optimizer"], end.optimizer)
    # the uninterrupted run's state at that step: what a resumed run starts from
    reference = End()
    make_trainer(tmp_path / "reference", [reference], max_steps=7, save=False).train()
    assert same(payload["model"], reference.weights) and same(payload["optimizer"], reference.optimizer)
    assert torch.equal(_logits(payload["model"]), _logits(reference.weights))
    assert callback.best_values["best_eval_accuracy.pt"] is not None  # the evaluation at step 4 decided


def _logits(weights) -> torch.Tensor:
    model = GPT2LMHeadModel(model_config())
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        return model(FIXED_INPUT).logits


def test_a_signal_during_an_evaluation_is_saved_at_its_end_with_what_improved_in_one_write(tmp_path):
    events = []
    callback = Checkpointing(CONFIG, tmp_path / "ckptfn", save_on="SIGTERM", on_saved=events.append)
    make_trainer(tmp_path, [Kill(5, signal.SIGTERM, in_evaluation=True), callback], save=False).train()
    assert callback.preempted.signals == ("SIGTERM",) and callback.preempted.global_step == 8
    at_stop = [event for event in events if event.global_step == 8]
    assert "last.pt" in [event.name for event in at_stop] and len({event.bytes for event in at_stop}) == 1
    assert ckptfn.read_metadata(tmp_path / "ckptfn" / "last.pt")["global_step"] == 8
    assert max(event.global_step for event in events) == 8  # nothing after


def test_save_on_comes_from_the_config_too_and_chains_to_the_previous_handler(tmp_path):
    heard = []
    mine = lambda number, frame: heard.append(number)  # noqa: E731
    signal.signal(signal.SIGUSR1, mine)
    try:
        config = ckptfn.Config(CONFIG, save_on=("SIGUSR1",))
        callback = Checkpointing(config, tmp_path / "ckptfn", save_on=[signal.SIGTERM])
        assert callback.config.save_on == ("SIGUSR1", "SIGTERM")
        make_trainer(tmp_path, [Kill(2), callback], save=False).train()
        assert callback.preempted.global_step == 3 and heard == [signal.SIGUSR1]  # recorded, then chained
        assert signal.getsignal(signal.SIGUSR1) is mine and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_without_save_on_signals_are_not_intercepted(tmp_path):
    heard = []
    signal.signal(signal.SIGUSR1, lambda number, frame: heard.append(number))
    try:
        callback, end = Checkpointing(CONFIG, tmp_path / "ckptfn"), End()
        make_trainer(tmp_path, [Kill(2), callback, end], max_steps=8, save=False).train()
        assert heard == [signal.SIGUSR1] and callback.preempted is None and end.global_step == 8
        assert not (tmp_path / "ckptfn" / "last.pt").exists()
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_a_watch_left_by_a_train_that_failed_elsewhere_is_closed_by_the_next_train(tmp_path):
    """The Trainer has no exception hook: a failure in ckptfn's own hooks puts the handlers back at
    once; one in another callback (or the model) leaves them to the next train() (or to gc)."""
    class Failing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("boom")

    callback = Checkpointing(CONFIG, tmp_path / "ckptfn", save_on="SIGUSR1")
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, [Failing(), callback], save=False).train()
    assert callback._watch is not None  # train() raised past on_train_end: the next one (or gc) closes it
    make_trainer(tmp_path, [Kill(1), callback], max_steps=4, save=False).train()
    assert callback.preempted.global_step == 2 and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    broken = Checkpointing(CONFIG, tmp_path / "broken", save_on="SIGUSR1")
    with pytest.MonkeyPatch.context() as patch:  # its own (preemption) write fails
        patch.setattr(ckptfn.io.write, "write_snapshot", lambda *args, **kwargs: write_snapshot(*args, fs=FailingFS("write", 0), **kwargs))
        with pytest.raises(ckptfn.CheckpointWriteError, match="No space left on device"):
            make_trainer(tmp_path, [Kill(1), broken], max_steps=4, save=False).train()
    assert broken.preempted is None and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # put back at once
