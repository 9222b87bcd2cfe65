"""Bad input, fuzzed with hypothesis; every function counts what it tried.

- ``Config.from_mapping`` over arbitrary JSON-like data (and near-valid configs):
  a ``Config`` or ``ConfigError``, nothing else.
- ``ckptfn.restore`` over arbitrary saved-state data: a ``State`` or ``ConfigError``.
- ``step`` over arbitrary metric mappings (nested; Python, numpy and torch values of
  every dtype and shape; huge, tiny, subnormal, -0.0, NaN): ``Save``/``Skip`` actions
  or ``MetricTypeError``.
- strategy filenames over arbitrary text: ``ConfigError``, or a save that creates
  exactly that one name inside the directory.
- ``load_checkpoint``/``read_metadata`` over mutated checkpoint bytes (bit flips,
  truncations, appended garbage, overwritten runs, swapped/dropped/duplicated zip
  members): loaded or ``CheckpointError``. This one runs in a separate interpreter
  (``python -m tests.reliability.fuzz --mutations N``) watched by the parent, so an
  interpreter crash or a hang is caught and reported with the case that caused it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from decimal import Decimal
from fractions import Fraction

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptfn
from ckptfn import CheckpointError, Config, ConfigError, MetricTypeError, Save, Skip, Strategy
from ckptfn.core.config import STRATEGY_KEYS

from tests.reliability.common import ROOT, Tally, clock

SECTION = "input"
CONFIG = "Config.from_mapping: JSON-like data"
STATE = "restore: saved-state data"
METRICS = "step: metric mappings"
FILENAME = "strategy filename: any text"
MUTATION = "load/read_metadata: mutated bytes ({})"


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# --- JSON-like data -------------------------------------------------------------------------

ODD_NUMBERS = st.sampled_from([0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1e308, -1e308, 10**400, -(10**400),
                               math.inf, -math.inf, math.nan, 2**63, -(2**63) - 1, 1e-320])
ODD_TEXT = st.sampled_from(["", ".", "..", "../x.pt", "a/b", "\0", "\udc80", "\ud800", "x" * 300, "min", "max", "MIN",
                            "val_loss", "a..b", ".hidden", "C:x", "true", "null", "best.pt", "é.pt"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), ODD_NUMBERS, ODD_TEXT)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12) | ODD_TEXT, inner, max_size=5),
    max_leaves=25,
)
keys = st.sampled_from(STRATEGY_KEYS + ("mdoe", "enabled", "strategies", "")) | st.text(max_size=8)
odd_values = ODD_NUMBERS | ODD_NUMBERS | ODD_TEXT | json_like


@st.composite
def perturbed(draw, valid: dict, extra_keys=keys) -> dict:
    """``valid`` with one to three keys removed, replaced by odd values, or added."""
    data = dict(valid)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(data)) | extra_keys) if data else draw(extra_keys)
        if key in data and draw(st.integers(0, 3)) == 0:
            del data[key]
        else:
            data[key] = draw(odd_values)
    return data


VALID_STRATEGY = {"metric_name": "val_loss", "mode": "min", "filename": "best_loss.pt", "overwrite": False,
                  "min_delta": 0.0}
strategy_like = st.one_of(
    st.dictionaries(keys, json_like, max_size=7),
    perturbed(VALID_STRATEGY),
    perturbed(VALID_STRATEGY),
)
config_like = st.one_of(
    json_like,
    strategy_like,
    st.lists(strategy_like, max_size=4),
    st.lists(perturbed(VALID_STRATEGY) | st.just(VALID_STRATEGY), min_size=1, max_size=3).map(
        lambda items: {"enabled": True, "strategies": items}
    ),
    st.fixed_dictionaries({}, optional={"enabled": json_like, "strategies": json_like | st.lists(strategy_like, max_size=3)}),
)


def fuzz_configs(tally: Tally, examples: int) -> None:
    @_settings(examples)
    @given(config_like)
    def check(data):
        tally.tried(SECTION, CONFIG)
        try:
            result = Config.from_mapping(data)
        except ConfigError:
            return
        except Exception as error:  # noqa: BLE001
            tally.problem(SECTION, CONFIG, "unexpected", f"{type(error).__name__}: {error} for {data!r:.300}")
            return
        if not isinstance(result, Config):
            tally.problem(SECTION, CONFIG, "unexpected", f"returned {result!r:.200}")

    check()


VALID_SAVED = {"metric_name": "val_loss", "mode": "min", "filename": "best_val_loss.pt", "overwrite": True,
               "min_delta": 0.0, "best": 0.5, "best_epoch": 3}
saved_strategy = perturbed(VALID_SAVED, st.sampled_from(sorted(VALID_SAVED)))
state_like = st.one_of(
    json_like,
    st.lists(saved_strategy, min_size=1, max_size=3).map(
        lambda items: {"format": "ckptfn.state/1", "steps": 4, "enabled": True, "strategies": items}
    ),
    perturbed({"format": "ckptfn.state/1", "steps": 4, "enabled": True, "strategies": [VALID_SAVED]}),
)


def fuzz_states(tally: Tally, examples: int) -> None:
    config = Config([Strategy("val_loss"), Strategy("val_corr", mode="max")])

    @_settings(examples)
    @given(state_like)
    def check(data):
        tally.tried(SECTION, STATE)
        try:
            ckptfn.restore(config, data)
        except ConfigError:
            return
        except Exception as error:  # noqa: BLE001
            tally.problem(SECTION, STATE, "unexpected", f"{type(error).__name__}: {error} for {data!r:.300}")

    check()


# --- metric values ---------------------------------------------------------------------------

FLOATS = st.one_of(st.floats(), ODD_NUMBERS.filter(lambda v: isinstance(v, float)), st.floats(width=16), st.floats(width=32))
NUMPY_DTYPES = ("float16", "float32", "float64", "longdouble", "int8", "int64", "uint8", "uint64", "bool", "complex64")
TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int32, torch.int64,
                torch.uint8, torch.bool, torch.complex64)
SHAPES = ((), (1,), (1, 1), (2,), (0,), (3, 1))


@st.composite
def numpy_values(draw):
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    value = draw(FLOATS | st.integers(-(2**70), 2**70))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scalar = np.array(value).astype(dtype)
        except (OverflowError, ValueError, TypeError):
            scalar = np.zeros((), dtype)
        shape = draw(st.sampled_from(SHAPES))
        return scalar[()] if shape == () and draw(st.booleans()) else np.broadcast_to(scalar, shape).copy()


@st.composite
def torch_values(draw):
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(st.sampled_from(SHAPES))
    value = draw(FLOATS | st.integers(-(2**40), 2**40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tensor = torch.full(shape, value).to(dtype)
        except (RuntimeError, OverflowError, TypeError):
            tensor = torch.zeros(shape, dtype=dtype)
    special = draw(st.sampled_from(["plain", "grad", "meta", "nested", "sparse", "view"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are "prototype"
        return _special(tensor, special, shape, dtype)


def _special(tensor: torch.Tensor, special: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if special == "grad" and tensor.is_floating_point():
        tensor = tensor.requires_grad_()
    elif special == "meta":
        tensor = torch.empty(shape, dtype=dtype, device="meta")
    elif special == "nested" and tensor.dim() >= 1:
        tensor = torch.nested.nested_tensor([tensor.reshape(-1)])
    elif special == "sparse" and tensor.dim() >= 1:
        tensor = tensor.to_sparse()
    elif special == "view" and tensor.numel():
        tensor = tensor.reshape(-1)[:1]
    return tensor


odd_objects = st.sampled_from(
    [None, "0.5", b"0.5", Decimal("0.5"), Decimal("NaN"), Fraction(1, 3), Fraction(10**400, 3), 1 + 2j, [0.5], (0.5,),
     {0.5}, object(), np.datetime64("2026-01-01"), np.str_("0.5"), np.ma.masked, range(1), ...]
)
metric_values = st.one_of(FLOATS, st.integers(), ODD_NUMBERS, st.booleans(), numpy_values(), torch_values(), odd_objects)
metric_names = st.sampled_from(["val_loss", "val_corr", "loss_components", "concordance", "a", "b"])
metric_maps = st.one_of(
    st.recursive(
        metric_values,
        lambda inner: st.dictionaries(metric_names | st.text(max_size=6) | st.sampled_from(["val_loss.x", "a.b"]), inner, max_size=5),
        max_leaves=12,
    ).filter(lambda m: isinstance(m, dict)),
    # the watched names present, each with any value (nested where the name is dotted)
    st.fixed_dictionaries(
        {},
        optional={
            "val_loss": metric_values,
            "val_corr": metric_values,
            "loss_components": st.dictionaries(st.just("concordance"), metric_values) | metric_values,
            "loss_components.concordance": metric_values,
            "a": st.fixed_dictionaries({"b": metric_values}) | metric_values,
        },
    ),
)

FUZZ_CONFIG = Config(
    [
        Strategy("val_loss"),
        Strategy("val_corr", mode="max", filename="best_corr.pt", overwrite=False),
        Strategy("loss_components.concordance", min_delta=0.5),
        Strategy("a.b", filename="ab.pt"),
    ]
)


def fuzz_metrics(tally: Tally, examples: int) -> None:
    @_settings(examples)
    @given(metric_maps, st.integers(0, 3))
    def check(metrics, warm):
        tally.tried(SECTION, METRICS)
        state = ckptfn.init(FUZZ_CONFIG)
        try:
            for _ in range(warm):
                state, _ = ckptfn.step(state, {"val_loss": 1.0, "val_corr": 0.0, "loss_components": {"concordance": 1.0}})
            new, actions = ckptfn.step(state, metrics)
        except MetricTypeError:
            return
        except Exception as error:  # noqa: BLE001
            tally.problem(SECTION, METRICS, "unexpected", f"{type(error).__name__}: {error} for {metrics!r:.300}")
            return
        for action in actions:
            if not isinstance(action, (Save, Skip)):
                tally.problem(SECTION, METRICS, "unexpected", f"action {action!r:.200}")
            elif isinstance(action, Save) and not (type(action.value) is float and math.isfinite(action.value)):
                tally.problem(SECTION, METRICS, "corruption", f"saved a non-finite or non-float best {action.value!r}")
        for before, after, strategy in zip(state.bests, new.bests, FUZZ_CONFIG.strategies):
            if before.value is not None and (after.value is None or (after.value > before.value if strategy.mode == "min" else after.value < before.value)):
                tally.problem(SECTION, METRICS, "lost", f"{strategy.filename}: best went from {before.value} to {after.value}")

    check()


# --- filenames --------------------------------------------------------------------------------

filenames = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=150, max_size=260),
    ODD_TEXT,
    st.builds(lambda a, b: a + b, st.sampled_from(["../", "/", "./", "..\\", "a/", "C:"]), st.text(max_size=10)),
)


def fuzz_filenames(tally: Tally, examples: int) -> None:
    with tempfile.TemporaryDirectory(prefix="ckptfn-names-") as work:
        work = pathlib.Path(work)
        counter = iter(range(10**9))

        @_settings(examples)
        @given(filenames)
        def check(filename):
            tally.tried(SECTION, FILENAME)
            try:
                strategy = Strategy("val_loss", filename=filename)
            except ConfigError:
                return
            except Exception as error:  # noqa: BLE001
                tally.problem(SECTION, FILENAME, "unexpected", f"{type(error).__name__}: {error} for {filename!r}")
                return
            run = work / f"run{next(counter)}"
            state, actions = ckptfn.step(ckptfn.init(strategy), {"val_loss": 1.0})
            try:
                ckptfn.execute(actions, {"w": torch.ones(2)}, run, state=state)
                created = os.listdir(run)
            except Exception as error:  # noqa: BLE001 - an accepted name must be writable
                tally.problem(SECTION, FILENAME, "unexpected", f"accepted {filename!r:.80} but cannot save: {type(error).__name__}: {error!s:.200}")
                return
            stray = [name for name in os.listdir(work) if not name.startswith("run")]
            if created != [filename] or stray:
                tally.problem(SECTION, FILENAME, "unexpected", f"{filename!r}: created {created}, and outside: {stray}")

        check()


# --- mutated checkpoint bytes (runs in a worker interpreter) ------------------------------------

MUTATION_KINDS = ("bit flips", "truncation", "appended garbage", "overwritten run", "swapped zip members", "dropped or duplicated member")


def base_checkpoint() -> bytes:
    """A genuine checkpoint with a training-like payload and full metadata."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    state = ckptfn.init(Config([Strategy("val_loss"), Strategy("val_corr", mode="max")]))
    state, actions = ckptfn.step(state, {"val_loss": 0.25, "val_corr": 0.5})
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "note": "x",
               "flags": torch.tensor([True, False]), "ids": torch.arange(5), "nothing": None, "list": [1, 2.5, "s"]}
    with tempfile.TemporaryDirectory() as scratch:
        paths = ckptfn.execute(actions, payload, scratch, state=state, metrics={"val_loss": 0.25, "val_corr": 0.5}, now=clock(0))
        return paths[0].read_bytes()


def _members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    archive = zipfile.ZipFile(io.BytesIO(data))
    return [(info, archive.read(info.filename)) for info in archive.infolist()]


def _rezip(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, body in entries:
            archive.writestr(name, body)
    return out.getvalue()


def structure(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the non-tensor parts: local headers, data.pkl and small records, the central directory."""
    ranges = []
    for info, body in _members(data):
        end = info.header_offset + 30 + len(info.filename) + len(info.extra)
        ranges.append((info.header_offset, end + (len(body) if len(body) < 4096 else 0)))
    central = data.find(b"PK\x01\x02")
    ranges.append((central, len(data)))
    return ranges


@st.composite
def mutations(draw, base: bytes, regions: list[tuple[int, int]], kind: str):
    """``base`` mutated one way; half the positions fall in its structural parts."""
    data = bytearray(base)

    def position():
        if draw(st.booleans()):
            start, end = draw(st.sampled_from(regions))
            return draw(st.integers(start, max(start, end - 1)))
        return draw(st.integers(0, len(data) - 1))

    if kind == "bit flips":
        for _ in range(draw(st.integers(1, 16))):
            at = position()
            data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncation":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "appended garbage":
        data += draw(st.binary(min_size=1, max_size=512)) * draw(st.sampled_from([1, 1, 200]))
    elif kind == "overwritten run":
        at = position()
        chunk = draw(st.binary(min_size=1, max_size=64) | st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"PK\x03\x04", b"PK\x01\x02"]))
        data[at : at + len(chunk)] = chunk
    else:
        entries = [(info.filename, body) for info, body in _members(base)]
        i, j = draw(st.integers(0, len(entries) - 1)), draw(st.integers(0, len(entries) - 1))
        if kind == "swapped zip members":
            how = draw(st.sampled_from(["contents", "order"]))
            if how == "contents":
                entries[i], entries[j] = (entries[i][0], entries[j][1]), (entries[j][0], entries[i][1])
            else:
                entries[i], entries[j] = entries[j], entries[i]
        elif draw(st.booleans()):
            del entries[i]
        else:
            entries.insert(j, entries[i])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate names
            data = bytearray(_rezip(entries))
    return bytes(data)


def _checking(check, kind: str):
    def test(data):
        check(kind, data)

    return test


def mutation_worker(examples: int, progress: pathlib.Path, scratch: pathlib.Path, seed: int, sabotage: str | None = None) -> dict:
    """Runs in its own interpreter: mutate, load, count. The parent watches ``progress``.

    ``sabotage`` ("crash" or "hang", after 5 cases) tests the parent's watch.
    """
    base = base_checkpoint()
    regions = structure(base)
    counts = {kind: Counter() for kind in MUTATION_KINDS}
    unexpected: list[str] = []
    target = scratch / "best.pt"

    def check(kind, data):
        target.write_bytes(data)
        progress.write_text(json.dumps({"kind": kind, "size": len(data)}))
        counts[kind]["tried"] += 1
        if sabotage and sum(c["tried"] for c in counts.values()) > 5:
            os.abort() if sabotage == "crash" else time.sleep(3600)
        for reader in (ckptfn.load_checkpoint, ckptfn.read_metadata):
            try:
                reader(target)
                counts[kind]["loaded"] += 1
            except CheckpointError:
                counts[kind]["refused"] += 1
            except Exception as error:  # noqa: BLE001
                unexpected.append(f"{kind}: {reader.__name__}: {type(error).__name__}: {error!s:.200}")

    import hypothesis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, kind in enumerate(MUTATION_KINDS):
            share = examples // len(MUTATION_KINDS) + (index < examples % len(MUTATION_KINDS))
            hypothesis.seed(seed + index)(_settings(share)(given(mutations(base, regions, kind))(_checking(check, kind))))()
    return {"counts": {kind: dict(c) for kind, c in counts.items()}, "unexpected": unexpected}


def _ram() -> str | None:
    shm = pathlib.Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def fuzz_mutations(
    tally: Tally, examples: int, *, seed: int = 0, stall: float = 30.0, limit: float = 900.0, sabotage: str | None = None
) -> None:
    """Run ``mutation_worker`` in a fresh interpreter; a crash or a stall of ``stall`` s is a failure."""
    with tempfile.TemporaryDirectory(prefix="ckptfn-fuzz-", dir=_ram()) as work:
        progress = pathlib.Path(work) / "progress.json"
        result = pathlib.Path(work) / "result.json"
        command = [sys.executable, "-m", "tests.reliability.fuzz", "--mutations", str(examples), "--seed", str(seed),
                   "--progress", str(progress), "--scratch", work, "--result", str(result)]
        command += ["--sabotage", sabotage] if sabotage else []
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started, last, seen = time.monotonic(), time.monotonic(), None
        while child.poll() is None:
            time.sleep(0.2)
            stamp = progress.stat().st_mtime_ns if progress.exists() else None
            if stamp != seen:
                seen, last = stamp, time.monotonic()
            allowed = stall if seen is not None else max(stall, 120.0)  # the first case waits for imports
            if time.monotonic() - last > allowed or time.monotonic() - started > limit:
                child.kill()
                child.wait()
                case = _failing_case(pathlib.Path(work), keep=sabotage is None)
                tally.problem(SECTION, MUTATION.format("worker"), "unexpected", f"the worker hung on {case}")
                return
        if child.returncode != 0 or not result.exists():
            case = _failing_case(pathlib.Path(work), keep=sabotage is None)
            stderr = child.stderr.read().decode(errors="replace")[-500:]
            tally.problem(SECTION, MUTATION.format("worker"), "unexpected",
                          f"the worker died (exit {child.returncode}) on {case}: {stderr}")
            return
        report = json.loads(result.read_text())
    for kind, counts in report["counts"].items():
        tally.tried(SECTION, MUTATION.format(kind), counts.get("tried", 0))
    for message in report["unexpected"]:
        tally.problem(SECTION, MUTATION.format(message.split(":")[0]), "unexpected", message)


def _failing_case(work: pathlib.Path, *, keep: bool) -> str:
    """What the worker was reading when it crashed or hung; with ``keep``, a copy of the file to reproduce it."""
    progress, case = work / "progress.json", work / "best.pt"
    if not progress.exists():
        return "before the first case"
    described = progress.read_text()[:200]
    if keep and case.exists():
        copy = pathlib.Path(tempfile.gettempdir()) / f"ckptfn-fuzz-case-{time.time_ns()}.pt"
        shutil.copyfile(case, copy)
        described += f" (the file is kept at {copy})"
    return described


def run(examples: int = 1000, mutation_examples: int = 3000) -> Tally:
    tally = Tally()
    fuzz_configs(tally, examples)
    fuzz_states(tally, examples)
    fuzz_metrics(tally, examples)
    fuzz_filenames(tally, max(50, examples // 4))
    fuzz_mutations(tally, mutation_examples)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", type=pathlib.Path, required=True)
    parser.add_argument("--scratch", type=pathlib.Path, required=True)
    parser.add_argument("--result", type=pathlib.Path, required=True)
    parser.add_argument("--sabotage", choices=["crash", "hang"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    report = mutation_worker(args.mutations, args.progress, args.scratch, args.seed, args.sabotage)
    args.result.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
