"""Reading a remote checkpoint's metadata fetches only the zip's directory and ``data.pkl``.

    python tests/benchmarks/remote_read.py [--mb SIZE] [--repeat N] [--write-readme]

Starts moto's S3 server on 127.0.0.1 (nothing else is contacted), writes one ckptfn
checkpoint of ``--mb`` MiB (1024 by default) into a bucket with ``ckptfn.kit.write``,
then measures, side by side, ``ckptfn.read_metadata(url)`` against a full download of
the same object (``cat_file``): bytes fetched (counted at the store's range reads) and the
median wall time of ``--repeat`` runs. ``--write-readme`` writes the table into the
README's ``remote-read`` region.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

COLUMNS = ("measurement", "bytes fetched", "median time (ms)", "vs full download")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args(argv)

    import fsspec
    import s3fs
    import torch
    from moto.server import ThreadedMotoServer

    import ckptfn
    from ckptfn import kit
    from tests.readme_regions import measured_note, write_region

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_address[1]}"
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**fsspec.config.conf["s3"])
        fs.mkdir("ckptfn-bench")
        url = "s3://ckptfn-bench/run"
        state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("val_loss")), {"val_loss": 0.5}, 0)
        payload = {f"w{i}": torch.zeros((args.mb << 18) // 16) for i in range(16)}
        kit.write(url, kit.plan(kit.partition(actions)[0], state=state), payload).raise_error()
        del payload
        key = "ckptfn-bench/run/best_val_loss.pt"
        size = fs.info(key)["size"]
        fetched: list[int] = []
        from ckptfn.io.objectstore import ObjectStore

        original = ObjectStore.read_ranges

        def counting(self, path, ranges):
            data = original(self, path, ranges)
            fetched.extend(len(chunk) for chunk in data)
            return data

        ObjectStore.read_ranges = counting
        metadata_times, full_times, metadata_bytes = [], [], []
        for _ in range(args.repeat):  # paired: one of each per repetition
            fetched.clear()
            start = time.perf_counter()
            assert ckptfn.read_metadata(f"{url}/best_val_loss.pt")["saves"][0]["value"] == 0.5
            metadata_times.append(time.perf_counter() - start)
            metadata_bytes.append(sum(fetched))
            start = time.perf_counter()
            data = fs.cat_file(key)
            full_times.append(time.perf_counter() - start)
            assert len(data) == size
            del data
        ObjectStore.read_ranges = original
    finally:
        server.stop()
    meta_ms, full_ms = statistics.median(metadata_times) * 1e3, statistics.median(full_times) * 1e3
    rows = [
        ("`read_metadata` of the object", f"{max(metadata_bytes):,}", f"{meta_ms:.1f}", f"{meta_ms / full_ms:.4f}"),
        ("full download (`cat_file`)", f"{size:,}", f"{full_ms:.1f}", "1"),
    ]
    table = "\n".join(
        ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|"] + ["| " + " | ".join(row) + " |" for row in rows]
    )
    facts = (
        f"ckptfn {ckptfn.__version__}, one checkpoint of {size / 2**20:,.0f} MiB in moto's S3 server on 127.0.0.1 "
        f"(s3fs {s3fs.__version__}), median of {args.repeat} paired runs; torch {torch.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs; target: under 1 MiB fetched. moto reads the "
        "whole object for every range request, so its times grow with the object's size, unlike S3's"
    )
    command = "python tests/benchmarks/remote_read.py" + (f" --mb {args.mb}" if args.mb != 1024 else "") + " --write-readme"
    body = measured_note(command, facts) + "\n\n" + table
    print(body)
    if args.write_readme:
        write_region("remote-read", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
