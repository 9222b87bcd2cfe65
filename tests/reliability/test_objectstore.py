"""Object stores (tests/reliability/objectstore.py), reduced: writers SIGKILLed mid single PUT and
mid multipart upload, and every request of one save failing in turn, against moto on 127.0.0.1.

The full run is ``python tests/reliability/objectstore.py`` (also part of report.py). The checks
are themselves checked: a broken protocol (one that deletes the old object before the new one is
uploaded) and a truncated object must be reported.
"""

from __future__ import annotations

import pytest

pytest.importorskip("moto.server", reason="the S3 tests need moto[server] and s3fs (ckptfn[test])")
pytest.importorskip("s3fs", reason="the S3 tests need moto[server] and s3fs (ckptfn[test])")

from tests.reliability import objectstore  # noqa: E402
from tests.reliability.common import Tally  # noqa: E402


def test_s3_writers_killed_mid_upload_and_failing_requests_lose_nothing():
    tally, unavailable, landed = objectstore.run(quick=True)
    assert unavailable == {}
    tally.assert_clean()
    # where a kill lands is a matter of timing (a loaded machine moves it): most land mid-upload
    assert tally.count("fault", objectstore.MID_PUT) + tally.count("fault", objectstore.MID_MULTIPART) >= 1
    assert tally.count("fault", objectstore.FAULTS) >= 10  # every store call of one save, failed in turn
    assert landed.startswith("S3: single PUTs killed at")


class DeletesFirst(objectstore.FaultyStore):
    """A broken protocol: the object at the name is deleted before the new one is uploaded."""

    def upload(self, local, path):
        if self.fs.exists(path):
            self.fs.rm(path)
        return super().upload(local, path)


def test_the_fault_checks_catch_a_protocol_that_deletes_before_it_uploads(monkeypatch):
    monkeypatch.setattr(objectstore, "FaultyStore", DeletesFirst)
    tally = Tally()
    with objectstore.s3_server():
        objectstore.faults(tally, epochs=(2,))
    assert any("lost" in problem and "upload failed" in problem for problem in tally.problems), tally.problems[:5]


def test_the_checks_see_a_truncated_object_under_a_final_name():
    with objectstore.s3_server():
        url, _state = objectstore._replayed(2)
        try:
            store, root = objectstore.store_for(url)
            data = store.read(f"{root}/best_loss.pt")
            store.put_bytes(data[: len(data) // 2], f"{root}/best_loss.pt")
            held = objectstore.look(url, objectstore.FAULT_CONFIG)
        finally:
            objectstore.drop_bucket(url)
    assert held["best_loss.pt"].problem and "does not load" in held["best_loss.pt"].problem
    assert held["best_corr.pt"].problem is None
