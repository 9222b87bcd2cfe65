"""Bytes that ckptfn's Hugging Face callback writes per evaluation, against one checkpoint's size.

    python tests/benchmarks/hf_bytes.py [--write-readme]

The tiny GPT-2 of tests/integrations/test_huggingface.py (built from a config, no
download), evaluated every 4 of 24 steps with three watched metrics. Bytes written =
``wchar`` of ``/proc/self/io`` around ``trainer.train()``, minus that of the same run
without the callback; one checkpoint = the size of a file ckptfn wrote. ``--write-readme``
writes the table into the README's ``hf-bytes`` region.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import platform
import sys
import tempfile
import warnings

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

COLUMNS = ("setup", "bytes written", "one checkpoint (bytes)", "checkpoints written", "names saved")


def _wchar() -> int:
    line = next(line for line in pathlib.Path("/proc/self/io").read_text().splitlines() if line.startswith("wchar:"))
    return int(line.split()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")
    import torch
    import transformers

    import ckptfn
    from ckptfn.integrations.huggingface import Checkpointing
    from tests.integrations import test_huggingface as hf
    from tests.readme_regions import measured_note, write_region

    torch.set_num_threads(1)

    def run(directory: pathlib.Path, callbacks) -> int:
        trainer = hf.make_trainer(directory, callbacks, save=False)
        before = _wchar()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        return _wchar() - before

    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        bare = run(scratch / "bare", [])
        recorder, callback = hf.Recorder(), Checkpointing(hf.STRATEGIES[:3])
        written = run(scratch / "ckptfn", [recorder, callback]) - bare
        sizes = sorted(p.stat().st_size for p in callback.output_dir.iterdir())
        _, per = hf.oracle(callback.config, recorder.seen)
        names = sum(len(hf.saves_of([actions])) for actions in per)
        evaluations = len(recorder.seen)
    one = sizes[-1]
    rows = [(
        f"one `Checkpointing`, {len(hf.STRATEGIES[:3])} metrics, {evaluations} evaluations",
        f"{written:,}", f"{one:,}", f"{written / one:.2f}", str(names),
    )]
    table = "\n".join(
        ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|---:|"] + ["| " + " | ".join(r) + " |" for r in rows]
    )
    facts = (
        f"ckptfn {ckptfn.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, CPU: a 2-layer GPT-2 from a config, {hf.MAX_STEPS} steps, evaluated every "
        f"{hf.EVAL_STEPS}; bytes written = `wchar` of `/proc/self/io` around `train()`, minus the same run without "
        f"the callback ({bare:,} bytes); one checkpoint = the largest file ckptfn wrote (files: {sizes[0]:,} to {one:,} bytes)"
    )
    body = measured_note("python tests/benchmarks/hf_bytes.py --write-readme", facts) + "\n\n" + table
    print(body)
    if args.write_readme:
        write_region("hf-bytes", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
