"""``ckptfn.integrations.lightning.Checkpointing`` with an S3 URL as ``dirpath`` (moto on 127.0.0.1):
the files land in the bucket, one upload per epoch, a second fit takes its bests from the bucket,
``fit(ckpt_path="last")`` resumes from it through Lightning's own fsspec loading."""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch

lightning = pytest.importorskip("lightning", reason="the Lightning tests need the 'lightning' extra (pip install 'ckptfn[test]')")

import ckptfn  # noqa: E402
from ckptfn.core.naming import archived_of  # noqa: E402
from ckptfn.integrations.lightning import Checkpointing  # noqa: E402
from ckptfn.io.objectstore import ObjectStore  # noqa: E402
from tests.integrations.test_lightning import STRATEGIES, Recorder, TinyModel, loaders, make_model, oracle, trainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")

NAMES = ["best_loss.ckpt", "best_mae.ckpt", "best_score.ckpt", "last.ckpt"]


def names(s3, url):
    s3.invalidate_cache()
    return sorted(p.rsplit("/", 1)[1] for p in s3.ls(url.removeprefix("s3://")))


@pytest.fixture
def store_calls(monkeypatch):
    """Every upload and server-side copy the object-store protocol makes."""
    calls = []
    real_upload, real_copy = ObjectStore.upload, ObjectStore.copy

    def upload(self, local, path):
        calls.append(("upload", path.rsplit("/", 1)[1]))
        return real_upload(self, local, path)

    def copy(self, source, target):
        calls.append(("copy", target.rsplit("/", 1)[1]))
        return real_copy(self, source, target)

    monkeypatch.setattr(ObjectStore, "upload", upload)
    monkeypatch.setattr(ObjectStore, "copy", copy)
    return calls


def test_the_files_land_in_the_bucket_one_upload_per_epoch_and_a_second_fit_judges_against_them(s3_url, s3, store_calls):
    train, val = loaders()
    events, recorder = [], Recorder()
    callback = Checkpointing(STRATEGIES, dirpath=s3_url, on_saved=events.append)
    trainer(3, [callback, recorder]).fit(make_model(), train, val)
    expected, per_epoch = oracle(callback.config, recorder.metrics, recorder.global_steps)
    assert callback.state == expected and callback.dirpath == s3_url
    listed = names(s3, s3_url)
    assert [n for n in listed if not archived_of(n, "best_mae.ckpt")] == NAMES  # best_mae keeps archives (keep=2)
    uploads = [name for kind, name in store_calls if kind == "upload"]
    assert len(uploads) == 3  # last.ckpt is saved every epoch: one upload each, whatever else improved
    saved_names = sum(len([a for a in actions if not isinstance(a, ckptfn.Skip)]) for actions in per_epoch)
    assert len(uploads) + [kind for kind, _ in store_calls].count("copy") >= saved_names  # the others: copies
    assert ckptfn.restore_from_directory(callback.config, s3_url).bests == callback.state.bests
    assert callback.best_model_path == s3_url + "/best_loss.ckpt" and callback.last_model_path == s3_url + "/last.ckpt"
    assert all(event.path.startswith(s3_url + "/") and event.bytes > 0 for event in events)
    payload, metadata = ckptfn.load_checkpoint(s3_url + "/last.ckpt")
    assert metadata["epoch"] == 2 and metadata["layout"] == "flat" and "state_dict" in payload
    # a new fit into the same bucket: its bests are the bucket's, and it says so
    second, start = Checkpointing(STRATEGIES, dirpath=s3_url), Recorder()
    with pytest.warns(UserWarning, match=r"s3://.*holds checkpoints of an earlier run"):
        trainer(1, [second, start]).fit(make_model(lr=0.0), train, val)
    assert start.state_at_start.bests[:3] == callback.state.bests[:3]


def test_fit_ckpt_path_last_resumes_from_the_bucket_through_lightnings_fsspec_loading(s3_url, s3, tmp_path):
    train, val = loaders()
    first = Checkpointing(STRATEGIES, dirpath=s3_url)
    trainer(2, [first]).fit(make_model(), train, val)
    resumed, recorder = Checkpointing(STRATEGIES, dirpath=s3_url), Recorder()
    fit = trainer(4, [resumed, recorder])
    fit.fit(make_model(), train, val, ckpt_path="last")
    assert fit.ckpt_path == s3_url + "/last.ckpt"
    assert recorder.state_at_start.bests == first.state.bests and [e for e, _ in recorder.metrics] == [2, 3]
    assert ckptfn.read_metadata(s3_url + "/last.ckpt")["epoch"] == 3
    local = Checkpointing(STRATEGIES)  # the same four epochs in one fit, on a local disk
    whole = trainer(4, [local], default_root_dir=tmp_path)
    whole.fit(make_model(), train, val)
    assert resumed.state.bests == local.state.bests
    model = TinyModel.load_from_checkpoint(s3_url + "/best_loss.ckpt")  # Lightning reads the URL too
    assert model.hparams.hidden == 8
    results = fit.validate(make_model(), val, ckpt_path="best", verbose=False)
    assert fit.ckpt_path == s3_url + "/best_loss.ckpt" and "val_loss" in results[0]


def test_without_dirpath_a_remote_default_root_dir_is_used_like_model_checkpoint(s3_url, s3):
    train, val = loaders()
    callback = Checkpointing(STRATEGIES[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(1, [callback], default_root_dir=s3_url).fit(make_model(), train, val)
    assert callback.dirpath == s3_url + "/checkpoints"
    assert names(s3, s3_url + "/checkpoints") == ["best_loss.ckpt"]


def test_a_preemption_save_goes_to_the_bucket_and_names_its_objects(s3_url, s3):
    class Kill(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                os.kill(os.getpid(), signal.SIGUSR1)

    train, val = loaders()
    callback = Checkpointing(STRATEGIES, dirpath=s3_url, save_on="SIGUSR1")
    trainer(3, [callback, Kill()]).fit(make_model(), train, val)
    assert callback.preempted.global_step == 6 and callback.preempted.paths == (s3_url + "/last.ckpt",)
    assert ckptfn.read_metadata(s3_url + "/last.ckpt")["global_step"] == 6
    assert ckptfn.verify_checkpoint(s3_url + "/last.ckpt", level="full").ok
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    raw, _ = ckptfn.load_checkpoint(s3_url + "/last.ckpt")
    assert raw["global_step"] == 6 and isinstance(raw["state_dict"]["net.0.weight"], torch.Tensor)
