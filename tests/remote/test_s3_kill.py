"""A writer killed during an upload leaves the complete old object at every name (real SIGKILL, moto on 127.0.0.1)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import ckptfn
from ckptfn.io.objectstore import store_for

CHILD = textwrap.dedent(
    """
    import sys, fsspec, torch, ckptfn
    from ckptfn import kit
    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": sys.argv[1]}, "key": "testing", "secret": "testing"}
    url, epoch, mib = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    config = ckptfn.Config([ckptfn.Strategy("val_loss"), ckptfn.Strategy("val_corr", mode="max", overwrite=False), ckptfn.Every()])
    state = kit.restore_from_directory(config, url)
    new, actions = ckptfn.step(state, {"val_loss": 1.0 / (epoch + 1), "val_corr": float(epoch)}, epoch)
    snapshot = kit.plan(kit.partition(actions)[0], state=new)
    payload = {"w": torch.full((mib << 18,), float(epoch))}
    def uploading():
        print("uploading", flush=True)
    written = kit.write(url, snapshot, payload, on_serialized=uploading)
    written.raise_error()
    print("done", flush=True)
    """
)


def run_child(endpoint, url, epoch, mib, *, kill_after: float | None = None, until=None):
    child = subprocess.Popen([sys.executable, "-c", CHILD, endpoint, url, str(epoch), str(mib)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    if kill_after is None:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0 and "done" in out
        return None
    assert child.stdout.readline().strip() == "uploading"
    deadline = time.monotonic() + 30
    while until is not None and not until() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(kill_after)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    return child.returncode


@pytest.mark.parametrize("mib, kill_after", [(48, 0.05), (160, 0.05)], ids=["single PUT", "multipart upload"])
def test_a_writer_killed_mid_upload_leaves_the_old_object_everywhere(s3_endpoint, s3_url, s3, mib, kill_after):
    run_child(s3_endpoint, s3_url, 0, 1)
    before = {name: s3.cat_file(f"{s3_url.removeprefix('s3://')}/{name}") for name in ("best_val_loss.pt", "best_val_corr.pt", "last.pt")}
    root = s3_url.removeprefix("s3://")
    bucket = root.split("/")[0]
    started = (lambda: bool(s3.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads"))) if mib > 100 else None
    assert run_child(s3_endpoint, s3_url, 1, mib, kill_after=kill_after, until=started) == -signal.SIGKILL
    s3.invalidate_cache()
    uploads = s3.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert len(uploads) == (1 if mib > 100 else 0)  # the killed multipart upload: started, never completed
    changed = []
    for name, data in before.items():  # every name: the complete old object or the complete new one
        now = s3.cat_file(f"{root}/{name}")
        value = ckptfn.load_checkpoint(f"{s3_url}/{name}")[0]["w"][0].item()
        assert value == (0.0 if now == data else 1.0)
        changed += [name] if now != data else []
    assert "last.pt" not in changed  # killed before the last name: the kill really cut the save
    state = ckptfn.restore_from_directory(
        [ckptfn.Strategy("val_loss"), ckptfn.Strategy("val_corr", mode="max", overwrite=False), ckptfn.Every()], s3_url
    )
    assert state.bests[0].epoch in (0, 1)
    store, key = store_for(s3_url)
    assert store.abort_abandoned_uploads(key, dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30000)) == 0  # too young
    run_child(s3_endpoint, s3_url, 2, 1)  # a restarted writer saves over whatever the kill left...
    assert ckptfn.read_metadata(f"{s3_url}/last.pt")["epoch"] == 2
    # ...and aborts the abandoned upload (moto dates every upload in 2010, so it counts as an hour old)
    assert s3.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
