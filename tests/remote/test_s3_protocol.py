"""The object-store protocol against a real S3 API (moto on 127.0.0.1): names, archives, top-k, reads."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

import ckptfn
from ckptfn import kit

s3fs = pytest.importorskip("s3fs")
from ckptfn.io.objectstore import ObjectStore, store_for


def update(state, metrics, epoch, url, payload, *, store=None, global_step=None):
    new, actions = ckptfn.step(state, metrics, epoch, global_step=global_step)
    saves, _ = kit.partition(actions)
    if not saves:
        return new, ()
    written = kit.write(url, kit.plan(saves, state=new, metrics=metrics), payload, fs=store)
    kept = kit.state_to_keep(new.config, url, state, new, written)
    written.raise_error()
    return kept, written.paths


def names(s3, url):
    return sorted(p.rsplit("/", 1)[1] for p in s3.ls(url.removeprefix("s3://"), refresh=True))


def test_one_upload_per_snapshot_the_other_names_are_server_side_copies(s3_url, s3):
    config = ckptfn.Config([ckptfn.Strategy("val_loss"), ckptfn.Strategy("val_acc", mode="max"), ckptfn.Every()])
    store, _ = store_for(s3_url)
    calls = []

    class Counting(ObjectStore):
        def upload(self, local, path):
            calls.append(("upload", path))
            super().upload(local, path)

        def copy(self, source, target):
            calls.append(("copy", target))
            super().copy(source, target)

    counting = Counting(store.fs, "s3")
    state, paths = update(ckptfn.init(config), {"val_loss": 0.5, "val_acc": 0.7}, 0, s3_url, {"w": torch.arange(1000.0)}, store=counting)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["best_val_loss.pt", "best_val_acc.pt", "last.pt"]
    assert [kind for kind, _ in calls] == ["upload", "copy", "copy"]
    assert names(s3, s3_url) == ["best_val_acc.pt", "best_val_loss.pt", "last.pt"]
    payload, metadata = ckptfn.load_checkpoint(s3_url + "/last.pt")
    assert torch.equal(payload["w"], torch.arange(1000.0)) and metadata["epoch"] == 0
    assert ckptfn.read_metadata(s3_url + "/best_val_acc.pt")["saves"][1]["value"] == 0.7
    assert ckptfn.restore_from_directory(config, s3_url) == state


def test_archives_keep_and_top_k_follow_the_same_rules_as_on_disk(s3_url, s3, tmp_path):
    config = ckptfn.Config([
        ckptfn.Strategy("val_corr", mode="max", overwrite=False, keep=2),
        ckptfn.Strategy("acc", mode="max", top_k=3),
    ])
    values = [(0.1, 0.50), (0.2, 0.45), (0.3, 0.60), (0.25, 0.55), (0.4, 0.58)]
    remote, local = ckptfn.init(config), ckptfn.init(config)
    for epoch, (corr, acc) in enumerate(values):
        metrics = {"val_corr": corr, "acc": acc}
        remote, _ = update(remote, metrics, epoch, s3_url, {"epoch": epoch})
        local, _ = update(local, metrics, epoch, str(tmp_path), {"epoch": epoch})
    assert remote == local
    remote_names, local_names = names(s3, s3_url), sorted(p.name for p in tmp_path.iterdir())
    strip = lambda ns: sorted(n for n in ns if not n.startswith("best_val_corr_"))  # noqa: E731 (stamps differ)
    assert strip(remote_names) == strip(local_names) == [
        "best_acc-epoch=3.pt", "best_acc-epoch=4.pt", "best_acc.pt", "best_val_corr.pt",
    ]
    assert len([n for n in remote_names if n.startswith("best_val_corr_")]) == 1  # keep=2: the file + 1 archived
    assert ckptfn.restore_from_directory(config, s3_url) == remote
    archived = next(n for n in remote_names if n.startswith("best_val_corr_"))
    assert ckptfn.read_metadata(f"{s3_url}/{archived}")["epoch"] == 2  # the previous best (saves at 0, 1, 2, 4), complete


def test_reading_metadata_fetches_only_ranges(s3_url, s3, monkeypatch):
    update(ckptfn.init(ckptfn.Strategy("val_loss")), {"val_loss": 0.5}, 0, s3_url, {"w": torch.zeros(4 << 20)})
    fetched = []
    original = ObjectStore.read_ranges

    def counting(self, path, ranges):
        data = original(self, path, ranges)
        fetched.extend(len(chunk) for chunk in data)
        return data

    monkeypatch.setattr(ObjectStore, "read_ranges", counting)
    metadata = ckptfn.read_metadata(s3_url + "/best_val_loss.pt")
    assert metadata["saves"][0]["value"] == 0.5
    size = s3.info(s3_url.removeprefix("s3://") + "/best_val_loss.pt")["size"]
    assert size > 16 << 20 and 0 < sum(fetched) < (1 << 20), (sum(fetched), size)


def test_a_failing_put_raises_and_the_state_matches_the_bucket(s3_url, s3):
    config = ckptfn.Config([ckptfn.Strategy("val_loss"), ckptfn.Every()])
    state, _ = update(ckptfn.init(config), {"val_loss": 0.5}, 0, s3_url, {"epoch": 0})
    store, _ = store_for(s3_url)

    class FailingCopy(ObjectStore):
        def copy(self, source, target):
            raise ConnectionResetError("the connection was cut (injected)")

    failing = FailingCopy(store.fs, "s3")
    new, actions = ckptfn.step(state, {"val_loss": 0.25}, 1)
    written = kit.write(s3_url, kit.plan(kit.partition(actions)[0], state=new), {"epoch": 1}, fs=failing)
    assert isinstance(written.error, ckptfn.CheckpointWriteError) and "connection was cut" in str(written.error)
    assert written.outcome.published == ("best_val_loss.pt",)  # the upload landed, the copy did not
    kept = kit.state_to_keep(config, s3_url, state, new, written)
    assert kept == ckptfn.restore_from_directory(config, s3_url)
    assert ckptfn.read_metadata(s3_url + "/best_val_loss.pt")["epoch"] == 1
    assert ckptfn.read_metadata(s3_url + "/last.pt")["epoch"] == 0  # the old object, complete


def test_verify_reads_every_record_of_a_remote_checkpoint_and_finds_a_flipped_bit(s3_url, s3):
    update(ckptfn.init(ckptfn.Strategy("val_loss")), {"val_loss": 0.5}, 0, s3_url, {"w": torch.zeros(1000)})
    url = s3_url + "/best_val_loss.pt"
    verdict = ckptfn.verify_checkpoint(url)
    assert verdict.ok and verdict.records > 0 and "load" in verdict.checked, verdict
    key = url.removeprefix("s3://")
    data = bytearray(s3.cat_file(key))
    data[data.index(bytes(4000)) + 1234] ^= 0x10
    s3.pipe_file(key, bytes(data))
    damaged = ckptfn.verify_checkpoint(url)
    assert not damaged.ok and "CRC32 mismatch" in " ".join(damaged.problems)
    from ckptfn.io.verify import verify_checkpoints

    assert [v.ok for v in verify_checkpoints([s3_url])] == [False]
    with pytest.raises(ckptfn.CheckpointNotFoundError):
        ckptfn.verify_checkpoint(s3_url + "/missing.pt")
