"""A real S3 API for the tests: moto's server on 127.0.0.1, started and stopped here.

``s3_url`` is a fresh ``s3://<bucket>/run`` URL per test; fsspec (s3fs) is pointed at
the server through ``fsspec.config.conf``, so library code sees a plain S3 URL.
"""

from __future__ import annotations

import itertools
import os

import pytest

moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] and s3fs (ckptfn[test])")
s3fs = pytest.importorskip("s3fs", reason="the S3 tests need s3fs (ckptfn[test])")

_BUCKETS = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint():
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address  # the port the OS chose
    assert host == "127.0.0.1"
    endpoint = f"http://127.0.0.1:{port}"
    import fsspec

    previous = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
    yield endpoint
    if previous is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = previous
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """An ``s3fs.S3FileSystem`` on the server (fresh instance, no cached listings)."""
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, key="testing", secret="testing", skip_instance_cache=True)
    return fs


@pytest.fixture
def s3_url(s3):
    bucket = f"ckptfn-test-{next(_BUCKETS)}"
    s3.mkdir(bucket)
    return f"s3://{bucket}/run"
