"""``ckptfn.integrations.huggingface.Checkpointing`` with an S3 URL as ``output_dir`` (moto on
127.0.0.1): the files land in the bucket with one upload per write, the same decisions as on a
local disk; a second ``train()`` (a new run, or a resumed one) takes its bests from the bucket."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: no network, ever

import pytest  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the 'huggingface' extra")
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs accelerate (the 'huggingface' extra)")

import ckptfn  # noqa: E402
from ckptfn.integrations.huggingface import Checkpointing  # noqa: E402
from ckptfn.io.objectstore import ObjectStore  # noqa: E402
from tests.integrations.test_huggingface import BESTS, RESUME_AT, STRATEGIES, Recorder, make_trainer, oracle, saves_of, offline, one_thread  # noqa: E402,F401 - fixtures: autouse here too

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def names(s3, url):
    s3.invalidate_cache()
    return sorted(p.rsplit("/", 1)[1] for p in s3.ls(url.removeprefix("s3://")))


@pytest.fixture
def uploads(monkeypatch):
    """The object names each upload of the object-store protocol put, in order."""
    calls = []
    real = ObjectStore.upload

    def upload(self, local, path):
        calls.append(path.rsplit("/", 1)[1])
        return real(self, local, path)

    monkeypatch.setattr(ObjectStore, "upload", upload)
    return calls


def test_the_files_land_in_the_bucket_with_one_upload_per_write_and_a_second_run_judges_against_them(
    s3_url, s3, tmp_path, uploads
):
    events, recorder = [], Recorder()
    callback = Checkpointing(STRATEGIES, s3_url, on_saved=events.append)
    make_trainer(tmp_path / "run", [recorder, callback], save=False).train()
    expected, per_step = oracle(callback.config, recorder.seen)
    assert callback.state == expected and callback.output_dir == s3_url
    assert names(s3, s3_url) == sorted(BESTS + ["last.pt"])
    assert not (tmp_path / "run" / "ckptfn").exists()  # nothing local
    writes = [actions for actions in per_step if saves_of([actions])]
    assert len(uploads) == len(writes) and len(events) == len(saves_of(per_step))  # one upload per write
    assert all(event.path.startswith(s3_url + "/") and event.bytes > 0 for event in events)
    assert ckptfn.restore_from_directory(callback.config, s3_url) == expected
    assert callback.best_model_path == s3_url + "/best_eval_accuracy.pt"
    payload, metadata = ckptfn.load_checkpoint(s3_url + "/last.pt")
    assert metadata["global_step"] == 24 and payload["trainer_state"]["global_step"] == 24
    # a new run in the same bucket: its bests are the bucket's, and it says so
    second = Checkpointing(STRATEGIES, s3_url)
    with pytest.warns(UserWarning, match=r"s3://.*holds checkpoints of an earlier run"):
        make_trainer(tmp_path / "second", [second], max_steps=1, save=False).train()
    assert second.state.bests[:3] == expected.bests[:3]


def test_a_resumed_run_takes_its_bests_from_the_bucket(s3_url, s3, tmp_path):
    """The Trainer resumes from its own (local) checkpoint directory; ckptfn's bests come from the bucket."""
    part = Checkpointing(STRATEGIES, s3_url)
    make_trainer(tmp_path / "run", [part], max_steps=RESUME_AT).train()
    resumed = Checkpointing(STRATEGIES, s3_url)
    start = AtStart(resumed)
    trainer = make_trainer(tmp_path / "run", [resumed, start], max_steps=RESUME_AT + 8)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{RESUME_AT}"))
    assert start.global_step == RESUME_AT and start.state == part.state  # the bucket's bests
    assert ckptfn.restore_from_directory(resumed.config, s3_url).bests == resumed.state.bests
    assert ckptfn.read_metadata(s3_url + "/last.pt")["global_step"] == RESUME_AT + 8


class AtStart(transformers.TrainerCallback):
    """The ckptfn callback's state once the Trainer began (callbacks run in order: after it)."""

    def __init__(self, callback: Checkpointing) -> None:
        self.callback = callback

    def on_train_begin(self, args, state, control, **kwargs):
        self.global_step, self.state = state.global_step, self.callback.state
