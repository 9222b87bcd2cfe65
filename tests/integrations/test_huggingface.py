"""``ckptfn.integrations.huggingface.Checkpointing`` with a real ``transformers.Trainer`` on a tiny GPT-2, on CPU, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: no network, ever

import pathlib  # noqa: E402
import shutil  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the 'huggingface' extra")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate (the 'huggingface' extra)")
from transformers import (  # noqa: E402
    GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments,
)

import ckptfn  # noqa: E402
import ckptfn.io.write  # noqa: E402
from ckptfn import CheckpointWriteError, Every, MissingMetricError, Periodic, Strategy  # noqa: E402
from ckptfn.integrations.huggingface import Checkpointing  # noqa: E402
from ckptfn.io.write import write_snapshot  # noqa: E402

from tests.faults import FailingFS, RecordingFS  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

VOCAB, LENGTH, EVAL_STEPS, MAX_STEPS, RESUME_AT = 32, 16, 4, 24, 16
BESTS = ["best_eval_accuracy.pt", "best_eval_top3_accuracy.pt", "best_eval_worst_nll.pt"]
STRATEGIES = [
    Strategy("eval_accuracy", mode="max"),
    Strategy("eval/top3_accuracy", mode="max"),  # the W&B / TensorBoard spelling of eval_top3_accuracy
    Strategy("eval_worst_nll"),
    Every(n_steps=8, filename="last.pt"),
]
FIXED_INPUT = torch.arange(LENGTH).remainder(VOCAB).unsqueeze(0)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model trains ten times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Sequences(torch.utils.data.Dataset):
    """Token sequences counting up by a per-sequence stride (1, 2 or 3): learnable, random, built here."""

    def __init__(self, count: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (count, 1), generator=g)
        stride = torch.randint(1, 4, (count, 1), generator=g)
        self.ids = (start + stride * torch.arange(LENGTH)).remainder(VOCAB)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def per_token(logits, labels):
    """Reduce the logits at once (what compute_metrics needs): top-1 hit, top-3 hit, NLL per next token."""
    logits, target = logits[:, :-1], labels[:, 1:]
    top3 = logits.topk(3, dim=-1).indices
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return torch.stack([(top3[..., 0] == target).float(), (top3 == target[..., None]).any(-1).float(), nll], -1)


def three_metrics(prediction):
    hits = prediction.predictions
    return {
        "accuracy": float(hits[..., 0].mean()),
        "top3_accuracy": float(hits[..., 1].mean()),
        "worst_nll": float(hits[..., 2].mean(axis=1).max()),
    }


def model_config() -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH, bos_token_id=0, eos_token_id=0)


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(model_config())


def make_trainer(output_dir, callbacks, *, max_steps=MAX_STEPS, save=True, eval_dataset=None, model=None) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, eval_strategy="steps", eval_steps=EVAL_STEPS,
        save_strategy="steps" if save else "no", save_steps=RESUME_AT, report_to=[], use_cpu=True,
        per_device_train_batch_size=16, per_device_eval_batch_size=32, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_strategy="no", disable_tqdm=True, seed=0,
    )
    return Trainer(
        model=model or make_model(), args=args, train_dataset=Sequences(128, 0),
        eval_dataset=eval_dataset or Sequences(32, 1), compute_metrics=three_metrics,
        preprocess_logits_for_metrics=per_token, callbacks=callbacks,
    )


class Recorder(TrainerCallback):
    """What each ``on_evaluate`` saw: the metrics, the position, and the model's output on a fixed input."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, dict]] = []
        self.outputs: dict[int, torch.Tensor] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        self.seen.append((state.global_step, int(state.epoch or 0), dict(metrics)))
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            self.outputs[state.global_step] = model(FIXED_INPUT).logits.clone()


def oracle(config, seen):
    """The pure core folded over what ``on_evaluate`` saw (eval/top3_accuracy spelled as the strategy does)."""
    history = [{**metrics, "eval/top3_accuracy": metrics["eval_top3_accuracy"]} for _, _, metrics in seen]
    return ckptfn.scan(
        ckptfn.init(config), history, [epoch for _, epoch, _ in seen], global_steps=[step for step, _, _ in seen]
    )


def saves_of(per_step):
    return [action for actions in per_step for action in actions if not isinstance(action, ckptfn.Skip)]


def counting_writes(monkeypatch) -> list:
    """Replace the one write function's file producer with one that records every operation."""
    calls = []

    def recording_write(directory, targets, payload, metadata, **kwargs):
        fs = RecordingFS()
        paths = write_snapshot(directory, targets, payload, metadata, fs=fs, **kwargs)
        calls.append((paths, fs.ops, [os.stat(path) for path in paths]))  # before later writes replace them
        return paths

    monkeypatch.setattr(ckptfn.io.write, "write_snapshot", recording_write)
    return calls


def listing(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every path under the Trainer's checkpoint-* directories, with its mtime and size."""
    return {
        str(path.relative_to(root)): (path.stat().st_mtime_ns, path.stat().st_size)
        for checkpoint in sorted(root.glob("checkpoint-*"))
        for path in [checkpoint, *sorted(checkpoint.rglob("*"))]
    }


def file_record(path):
    """(value, epoch, global_step) of the save a best file holds, and the file's epoch and step."""
    metadata = ckptfn.read_metadata(path)
    save = next(s for s in metadata["saves"] if s["filename"] == pathlib.Path(path).name)
    return save.get("value"), save["epoch"], save["global_step"], metadata["epoch"], metadata["global_step"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted run: 24 steps, evaluated every 4, with the writes, the events and what each evaluation saw."""
    root = tmp_path_factory.mktemp("full")
    events, recorder = [], Recorder()
    callback = Checkpointing(STRATEGIES, on_saved=events.append)
    with pytest.MonkeyPatch.context() as patch:
        writes = counting_writes(patch)
        trainer = make_trainer(root, [recorder, callback])
        trainer.train()
    return types.SimpleNamespace(
        root=root, callback=callback, recorder=recorder, writes=writes, events=events, trainer=trainer
    )


# --- 1. the files, and the decisions of the pure core ----------------------------------------


def test_three_metrics_leave_three_best_files_with_the_decisions_of_the_pure_core(full_run):
    callback, seen = full_run.callback, full_run.recorder.seen
    assert callback.output_dir == full_run.root / "ckptfn"  # <args.output_dir>/ckptfn
    assert [step for step, _, _ in seen] == [4, 8, 12, 16, 20, 24]
    assert {"eval_loss", "eval_accuracy", "eval_top3_accuracy", "eval_worst_nll"} <= set(seen[0][2])
    expected, per_step = oracle(callback.config, seen)
    assert callback.state == expected
    assert sorted(os.listdir(callback.output_dir)) == sorted(BESTS + ["last.pt"])
    for strategy, best in zip(callback.config.strategies[:3], expected.bests):
        value, epoch, global_step, file_epoch, file_step = file_record(callback.output_dir / strategy.filename)
        assert (value, epoch, global_step) == (best.value, best.epoch, best.global_step)
        assert (file_epoch, file_step) == (best.epoch, best.global_step)
    assert ckptfn.restore_from_directory(callback.config, callback.output_dir).bests == callback.state.bests
    assert file_record(callback.output_dir / "last.pt")[1:3] == (3, 24)  # Every(n_steps=8): the last save at step 24
    assert len({best.global_step for best in expected.bests[:3]}) > 1, "the metrics disagree about the best step"
    assert callback.best_model_path == str(callback.output_dir / "best_eval_accuracy.pt")


def test_an_evaluation_outside_train_decides_nothing(full_run):
    before = {name: os.stat(full_run.callback.output_dir / name).st_mtime_ns for name in BESTS}
    state = full_run.callback.state
    full_run.trainer.evaluate()
    assert full_run.callback.state == state
    assert {name: os.stat(full_run.callback.output_dir / name).st_mtime_ns for name in BESTS} == before


# --- 2. one write per evaluation ---------------------------------------------------------------


def test_one_write_per_evaluation_whatever_the_number_of_metrics(full_run):
    _, per_step = oracle(full_run.callback.config, full_run.recorder.seen)
    saving = [actions for actions in per_step if saves_of([actions])]
    assert len(full_run.writes) == len(saving) <= len(per_step)
    assert [sorted(p.name for p in paths) for paths, _, _ in full_run.writes] == [
        sorted(a.filename for a in saves_of([actions])) for actions in saving
    ]
    assert max(len(paths) for paths, _, _ in full_run.writes) >= 3  # the first evaluation saves every name
    for paths, ops, stats in full_run.writes:
        written = sum(args[0] for op, args in ops if op == "write")
        assert [op for op, _ in ops].count("create") == 1 and written == stats[0].st_size  # one payload
        assert len({stat.st_ino for stat in stats}) == 1  # every name of the evaluation is that one file


def test_bytes_written_per_evaluation_are_one_payload(tmp_path, monkeypatch):
    """``wchar`` of ``/proc/self/io`` around two identical runs, with and without the callback."""
    io_file = pathlib.Path("/proc/self/io")
    if not io_file.exists():
        pytest.skip("/proc/self/io is Linux-only")

    def wchar() -> int:
        return int(next(line for line in io_file.read_text().splitlines() if line.startswith("wchar:")).split()[1])

    def measured(callbacks, name):
        trainer = make_trainer(tmp_path / name, callbacks, max_steps=12, save=False)
        before = wchar()
        trainer.train()
        return wchar() - before

    baseline = measured([], "without")
    writes = counting_writes(monkeypatch)
    with_ckptfn = measured([Checkpointing(STRATEGIES[:3])], "with")
    sizes = [stats[0].st_size for _, _, stats in writes]
    assert len(writes) == 3 and [len(paths) for paths, _, _ in writes][0] == 3  # 3 evaluations, 3 names at the first
    extra = with_ckptfn - baseline
    assert 0.98 * sum(sizes) < extra < sum(sizes) + min(sizes) / 2  # one payload per evaluation, none per name
    model = make_model()
    weights = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    assert weights < min(sizes) < 4 * weights  # the weights and AdamW's two moments, once


# --- 3. resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [None, False])  # resume=False only concerns runs that do not resume
def test_resume_from_the_trainers_checkpoint_continues_with_the_same_bests(full_run, tmp_path, resume):
    first = Checkpointing(STRATEGIES)
    make_trainer(tmp_path, [first], max_steps=RESUME_AT).train()  # stopped at step 16
    assert (tmp_path / f"checkpoint-{RESUME_AT}").is_dir()
    trainers_files = listing(tmp_path)
    assert trainers_files
    resumed = Checkpointing(STRATEGIES, resume=resume)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*holds checkpoints")  # a resumed run takes the files, silently
        make_trainer(tmp_path, [resumed]).train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{RESUME_AT}"))
    after = listing(tmp_path)
    assert {path: after[path] for path in trainers_files} == trainers_files  # never touched
    assert resumed.state.bests == full_run.callback.state.bests
    names = sorted(os.listdir(resumed.output_dir))
    assert names == sorted(os.listdir(full_run.callback.output_dir))
    for name in names:
        assert file_record(resumed.output_dir / name) == file_record(full_run.callback.output_dir / name)
        mine, theirs = (ckptfn.load_checkpoint(d / name)[0]["model"] for d in (resumed.output_dir, full_run.callback.output_dir))
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def test_a_new_run_in_a_used_directory_judges_against_its_files_unless_resume_false(full_run, tmp_path):
    directory = tmp_path / "ckptfn"
    shutil.copytree(full_run.callback.output_dir, directory)
    args, fresh = types.SimpleNamespace(output_dir=str(tmp_path)), TrainerState()
    judged = Checkpointing(STRATEGIES)
    with pytest.warns(UserWarning, match="earlier run .*best_eval_accuracy.pt"):
        judged.on_train_begin(args, fresh, TrainerControl())
    assert judged.best_values == full_run.callback.best_values
    quiet = Checkpointing(STRATEGIES, resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.on_train_begin(args, fresh, TrainerControl())
    assert quiet.state.bests == full_run.callback.state.bests
    scratch = Checkpointing(STRATEGIES, resume=False)
    with pytest.warns(UserWarning, match="resume=False"):
        scratch.on_train_begin(args, fresh, TrainerControl())
    assert set(scratch.best_values.values()) == {None}


# --- 4. inference ------------------------------------------------------------------------------


def test_best_files_load_for_inference_bit_identically(full_run):
    recorder = full_run.recorder
    for name in BESTS:
        path = full_run.callback.output_dir / name
        global_step = file_record(path)[2]
        raw = torch.load(path, weights_only=True)  # plain torch, safe loading of the whole file
        assert {"model", "optimizer", "lr_scheduler", "trainer_state", "rng"} <= set(raw["state_dict"])
        for key, tensor in recorder.weights[global_step].items():
            assert torch.equal(raw["state_dict"]["model"][key], tensor), key  # the model at the save
        model = GPT2LMHeadModel(model_config())
        model.load_state_dict(ckptfn.load_checkpoint(path)[0]["model"])  # the documented one-liner
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(FIXED_INPUT).logits, recorder.outputs[global_step])
        payload = raw["state_dict"]
        assert TrainerState(**payload["trainer_state"]).global_step == global_step
        optimizer = make_trainer(full_run.root / "unused", [], model=model).create_optimizer()  # the Trainer's groups
        optimizer.load_state_dict(payload["optimizer"])
        assert payload["lr_scheduler"]["last_epoch"] == global_step


# --- 5. a misspelt metric ----------------------------------------------------------------------


def test_a_misspelt_metric_fails_at_the_first_evaluation_with_the_names(tmp_path):
    recorder = Recorder()
    callback = Checkpointing([Strategy("eval_accuracyy", mode="max")])
    with pytest.raises(MissingMetricError, match="eval_accuracyy") as raised:
        make_trainer(tmp_path, [recorder, callback], save=False).train()
    message = str(raised.value)
    assert "eval_loss" in message and "eval_top3_accuracy" in message and "did you mean 'eval_accuracy'" in message
    assert [step for step, _, _ in recorder.seen] == [EVAL_STEPS]
    assert not callback.output_dir.exists() or os.listdir(callback.output_dir) == []


# --- 6. on_saved hooks -------------------------------------------------------------------------


def test_an_on_saved_hook_receives_one_event_per_name(full_run):
    _, per_step = oracle(full_run.callback.config, full_run.recorder.seen)
    expected = [(a.filename, a.global_step, None if isinstance(a, Periodic) else a.value) for a in saves_of(per_step)]
    assert [(e.name, e.global_step, e.value) for e in full_run.events] == expected
    assert {e.kind for e in full_run.events} == {"best", "periodic"}
    assert all(pathlib.Path(e.path).parent == full_run.callback.output_dir and e.bytes > 0 for e in full_run.events)


# --- errors, processes, several evaluation datasets --------------------------------------------


def test_a_failed_write_raises_with_a_state_that_matches_the_files(tmp_path, monkeypatch):
    calls = []

    def failing_second_write(*args, **kwargs):
        calls.append(len(calls))
        return write_snapshot(*args, fs=FailingFS("replace", 1) if len(calls) == 2 else RecordingFS(), **kwargs)

    monkeypatch.setattr(ckptfn.io.write, "write_snapshot", failing_second_write)
    callback = Checkpointing([Every(n_steps=4, filename="a.pt"), Every(n_steps=4, filename="b.pt")])
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        make_trainer(tmp_path, [callback], save=False).train()
    assert len(calls) == 2
    on_disk = ckptfn.restore_from_directory(callback.config, callback.output_dir)
    assert callback.state.bests == on_disk.bests
    assert [last.global_step for last in on_disk.bests] == [8, 4]  # a.pt took step 8, then b.pt failed


def test_only_world_process_zero_decides_and_writes(tmp_path):
    callback = Checkpointing([Strategy("eval_accuracyy")])  # would raise on process zero
    args, control = types.SimpleNamespace(output_dir=str(tmp_path)), TrainerControl()
    other = TrainerState(is_world_process_zero=False)
    callback.on_train_begin(args, other, control)
    other.global_step, other.epoch = 4, 0.5
    callback.on_evaluate(args, other, control, metrics={"eval_accuracy": 0.5}, model=torch.nn.Linear(2, 1))
    assert not (tmp_path / "ckptfn").exists()


@pytest.mark.parametrize("option", [{"fsdp": "full_shard"}, {"deepspeed": {"zero_optimization": {"stage": 3}}}])
def test_sharded_setups_are_refused_before_training(tmp_path, option):
    args = types.SimpleNamespace(output_dir=str(tmp_path), **option)
    with pytest.raises(RuntimeError, match="sharded across processes"):
        Checkpointing([Strategy("eval_loss")]).on_train_begin(args, TrainerState(), TrainerControl())


def test_several_evaluation_datasets_make_one_decision_and_one_write(tmp_path, monkeypatch):
    writes = counting_writes(monkeypatch)
    callback = Checkpointing([Strategy("eval_a_loss"), Strategy("eval_b_accuracy", mode="max")], evaluations=2)
    datasets = {"a": Sequences(32, 1), "b": Sequences(32, 2)}
    make_trainer(tmp_path, [callback], max_steps=EVAL_STEPS, save=False, eval_dataset=datasets).train()
    assert [sorted(p.name for p in paths) for paths, _, _ in writes] == [["best_eval_a_loss.pt", "best_eval_b_accuracy.pt"]]
    assert all(best.global_step == EVAL_STEPS for best in callback.state.bests)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="resume"):
        Checkpointing([Strategy("eval_loss")], resume="yes")
    with pytest.raises(ckptfn.ConfigError, match="save_on: a preemption save writes the config's Every strategies"):
        Checkpointing([Strategy("eval_loss")], save_on="SIGTERM")
    remote = Checkpointing([Strategy("eval_loss")], "s3://bucket/run")  # a URL: an object store (tests/remote)
    assert remote.output_dir == "s3://bucket/run" and remote.output_dir / "x.pt" == "s3://bucket/run/x.pt"
    with pytest.raises(ValueError, match="evaluations"):
        Checkpointing([Strategy("eval_loss")], evaluations=0)
