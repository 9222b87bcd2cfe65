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
import pickle
import shutil
import struct
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
from ckptfn import CheckpointError, Config, ConfigError, MetricTypeError, MissingMetricError, Save, Skip, Strategy
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
                state, _ = ckptfn.step(
                    state, {"val_loss": 1.0, "val_corr": 0.0, "loss_components": {"concordance": 1.0}, "a": {"b": 1.0}}
                )
            new, actions = ckptfn.step(state, metrics)
        except MetricTypeError:
            return
        except MissingMetricError as error:  # documented: only for a strategy that never saved
            never_saved = [s.metric_name for s, b in zip(FUZZ_CONFIG.strategies, state.bests) if b.value is None]
            if not any(repr(name) in str(error) for name in never_saved):
                tally.problem(SECTION, METRICS, "unexpected", f"MissingMetricError for a strategy that saved: {error}")
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


# --- every reader over fuzzed pickles and zip structures, in children with limits ---------------

PICKLES = "fuzzed pickles (read_metadata, load_checkpoint, peek_metadata)"
ZIPS = "fuzzed zip structures (read_metadata, load_checkpoint, peek_metadata)"
#: What one input may cost a child (all three readers): seconds, memory beyond what the child started with.
FUZZ_SECONDS, FUZZ_MEMORY = 5.0, 1 << 30
FUZZ_BATCH = 40  # inputs per child
FUZZ_SLACK = 30.0  # seconds a child may take beyond FUZZ_SECONDS per input (its start, the first torch.load)


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _read_all(path: pathlib.Path) -> tuple[dict, list]:
    """(In a child.) Each reader over ``path``: its outcome, and the problems it shows."""
    from ckptfn.io.peek import peek_metadata

    outcome, problems = {}, []
    for name, read in (("read_metadata", ckptfn.read_metadata), ("load_checkpoint", ckptfn.load_checkpoint),
                       ("peek_metadata", peek_metadata)):
        try:
            value = read(path)
            outcome[name] = "loaded" if value is not None else "torch decides"
            if name == "read_metadata":
                outcome["metadata"] = value
        except CheckpointError as error:
            outcome[name] = "refused"
            if str(path) not in str(error):
                problems.append(("unexpected", f"{name}: the error does not name the file: {str(error)[:200]}"))
            if "can't allocate" in str(error) or "MemoryError" in str(error):
                problems.append(("unexpected", f"{name} tried to allocate past the limit: {str(error)[:200]}"))
        except Exception as error:  # noqa: BLE001 - the point: only CheckpointError may escape
            outcome[name] = "unexpected"
            problems.append(("unexpected", f"{name}: {type(error).__name__}: {str(error)[:200]}"))
    if outcome["read_metadata"] == "loaded" and outcome["load_checkpoint"] != "loaded":
        problems.append(("corruption", "read_metadata accepts a file load_checkpoint refuses (resume would trust it)"))
    if outcome["peek_metadata"] == "loaded" and outcome["read_metadata"] != "loaded":
        problems.append(("unexpected", "peek_metadata accepts a file read_metadata refuses"))
    outcome.pop("metadata", None)
    return outcome, problems


def _fuzz_batch(inputs: list[bytes], scratch: str, progress: str) -> list:
    """(In a forked child.) Every reader over every input, under an address-space limit of
    FUZZ_MEMORY beyond the child's own, each input within FUZZ_SECONDS."""
    import logging
    import resource

    logging.getLogger().setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    limit = _vm_size() + FUZZ_MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    path = pathlib.Path(scratch) / "best.pt"
    results = []
    for index, data in enumerate(inputs):
        pathlib.Path(progress).write_text(str(index))
        path.write_bytes(data)
        started = time.monotonic()
        outcome, problems = _read_all(path)
        took = time.monotonic() - started
        if took > FUZZ_SECONDS:
            problems.append(("unexpected", f"the readers took {took:.1f} s"))
        results.append([outcome, problems])
    return results


def _run_batches(tally: Tally, kind: str, inputs: list[bytes], *, keep: bool = True) -> Counter:
    """Run ``inputs`` in batches of FUZZ_BATCH, each in a forked child with limits; count outcomes.
    With ``keep``, an input that shows a problem is kept in the temporary directory to reproduce it."""
    from tests.reliability.common import in_child

    def kept(data: bytes) -> str:
        if not keep:
            return ""
        path = pathlib.Path(tempfile.gettempdir()) / f"ckptfn-fuzz-case-{time.time_ns()}.pt"
        path.write_bytes(data)
        return f" (kept at {path})"

    outcomes: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix="ckptfn-fuzz-readers-", dir=_ram()) as work:
        progress = pathlib.Path(work) / "progress"
        for start in range(0, len(inputs), FUZZ_BATCH):
            batch = inputs[start : start + FUZZ_BATCH]
            tally.tried(SECTION, kind, len(batch))
            status, value = in_child(_fuzz_batch, batch, work, str(progress), timeout=FUZZ_SECONDS * len(batch) + FUZZ_SLACK)
            if status != "ok":
                at = int(progress.read_text()) if progress.exists() else 0
                tally.problem(SECTION, kind, "unexpected", f"the child: {status} {value} on input {start + at}{kept(batch[at])}")
                continue
            for index, (outcome, problems) in enumerate(value):
                outcomes[(outcome["read_metadata"], outcome["load_checkpoint"])] += 1
                for category, message in problems:
                    tally.problem(SECTION, kind, category, f"input {start + index}: {message}{kept(batch[index])}")
    return outcomes


def _collect(strategy, examples: int, seed: int) -> list[bytes]:
    """``examples`` inputs drawn from ``strategy`` (hypothesis, seeded: the same inputs every run)."""
    import hypothesis

    drawn: list[bytes] = []

    def keep(data):
        drawn.append(data)

    hypothesis.seed(seed)(_settings(examples)(given(strategy)(keep)))()
    return drawn


# pickles -------------------------------------------------------------------------------------------

_LEAVES = st.one_of(scalars, st.binary(max_size=24), st.complex_numbers(allow_nan=False, max_magnitude=1e6),
                    st.sampled_from([b"", bytearray(b"ab"), (), frozenset(), 10**30, -(2**70)]))
plain_values = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    | st.lists(inner, max_size=3).map(tuple) | st.sets(st.integers() | st.text(max_size=4), max_size=3),
    max_leaves=20,
)


def _snippets():
    """Raw opcodes that push one object a reader must survive: huge calls, declared lengths, deep
    nesting, foreign globals (from ``tests.reliability.hostile``)."""
    from tests.reliability import hostile

    sizes = st.sampled_from([0, 1, 255, 2**31 - 1, 2**31, 3 << 30, 2**62, 2**63 + 1])
    names = st.sampled_from(["builtins bytearray", "builtins set", "builtins complex", "_codecs encode",
                             "collections OrderedDict", "torch FloatTensor", "torch Tensor", "torch Size",
                             "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_qtensor", "os system",
                             "builtins eval", "torch _inductor", "builtins getattr", "collections Counter"])
    return st.one_of(
        sizes.map(hostile.bytearray_call),
        st.tuples(st.sampled_from([b"\x8e", b"\x96", b"\x8d"]), sizes).map(lambda a: hostile.declared(*a)),
        st.integers(1, 3000).map(hostile.deep_lists),
        st.integers(1, 3000).map(hostile.deep_dicts),
        st.tuples(names, sizes).map(lambda a: b"c" + a[0].replace(" ", "\n").encode() + b"\n" + hostile.long1(a[1]) + b"\x85R"),
        st.tuples(names, st.binary(max_size=12)).map(lambda a: b"c" + a[0].replace(" ", "\n").encode() + b"\nX"
                                                     + len(a[1]).to_bytes(4, "little") + a[1] + b"\x85R"),
        st.integers(1, 5000).map(lambda n: b"](" + b"N" * n + b"e"),
    )


@st.composite
def fuzzed_pickles(draw, base_pickle: bytes, boundaries: list[int]) -> bytes:
    """A data.pkl: plain metadata pickled with any protocol, a hostile snippet as a metadata value or
    inserted at an opcode boundary of a real data.pkl, or a real data.pkl with bytes flipped, cut,
    deleted or repeated."""
    from tests.reliability import hostile

    how = draw(st.sampled_from(["plain", "snippet", "inserted", "flipped", "cut", "spliced"]))
    if how == "plain":
        record = {"state_dict": draw(plain_values), "metadata": {"format": "ckptfn/1", "epoch": 0, "saves": [],
                                                                 "x": draw(plain_values)}}
        return pickle.dumps(record, protocol=draw(st.integers(0, 5)))
    if how == "snippet":
        return hostile.in_metadata(draw(_snippets()))
    data = bytearray(base_pickle)
    if how == "inserted":
        at = draw(st.sampled_from(boundaries))
        return bytes(data[:at] + draw(_snippets()) + data[at:])
    if how == "flipped":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if how == "cut":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    start = draw(st.integers(0, len(data) - 1))
    end = draw(st.integers(start, min(len(data), start + 64)))
    return bytes(data[:start] + data[start:end] * draw(st.integers(0, 3)) + data[end:])


def fuzz_pickles(tally: Tally, examples: int, *, seed: int = 0) -> Counter:
    """``examples`` fuzzed data.pkl members in a genuine checkpoint, through every reader in children
    with limits (``_fuzz_batch``). Returns how often each (read_metadata, load_checkpoint) outcome came."""
    import pickletools

    from tests.reliability.hostile import replace_member

    base = base_checkpoint()
    archive = zipfile.ZipFile(io.BytesIO(base))
    (name,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
    base_pickle = archive.read(name)
    boundaries = [position for _, _, position in pickletools.genops(base_pickle)]
    pickles = _collect(fuzzed_pickles(base_pickle, boundaries), examples, seed)
    inputs = [replace_member(base, "data.pkl", data) for data in pickles]
    return _run_batches(tally, PICKLES, inputs)


# zip structures -------------------------------------------------------------------------------------


def header_ranges(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of every zip header of ``data``: local headers (with names and extras), data
    descriptors, central directory entries, the zip64 records and the end record."""
    ranges = []
    archive = zipfile.ZipFile(io.BytesIO(data))
    for info in archive.infolist():
        name_size, extra_size = struct.unpack_from("<HH", data, info.header_offset + 26)
        start = info.header_offset + 30 + name_size + extra_size
        ranges.append((info.header_offset, start))
        if info.flag_bits & 0x8:
            ranges.append((start + info.file_size, start + info.file_size + 16))
    ranges.append((archive.start_dir, len(data)))
    return ranges


@st.composite
def fuzzed_zips(draw, base: bytes, ranges: list[tuple[int, int]]) -> bytes:
    """``base`` with bytes flipped or overwritten inside its headers, or cut at a header, or with two
    headers' fields swapped."""
    data = bytearray(base)
    how = draw(st.sampled_from(["flip", "flip", "overwrite", "cut", "field"]))
    start, end = draw(st.sampled_from(ranges))
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(start, end - 1))
            data[at] ^= draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 255]))
    elif how == "overwrite":
        at = draw(st.integers(start, end - 1))
        chunk = draw(st.sampled_from([b"\0\0\0\0", b"\xff\xff\xff\xff", b"PK\x03\x04", b"PK\x01\x02", b"\x08\x08"])
                     | st.binary(min_size=1, max_size=8))
        data[at : at + len(chunk)] = chunk
    elif how == "cut":
        del data[draw(st.integers(start, end)) :]
    else:  # a 2- or 4-byte field set to another header's value: offsets, sizes, lengths
        width = draw(st.sampled_from([2, 4]))
        at = draw(st.integers(start, max(start, end - width)))
        value = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, len(base), len(base) // 2])
                     | st.integers(0, 2**(8 * width) - 1))
        data[at : at + width] = (value % 2**(8 * width)).to_bytes(width, "little")
    return bytes(data)


def fuzz_zips(tally: Tally, examples: int, *, seed: int = 0) -> Counter:
    """``examples`` mutations of a genuine checkpoint's zip headers through every reader in children
    with limits; read_metadata must accept a file only if load_checkpoint loads it."""
    base = base_checkpoint()
    return _run_batches(tally, ZIPS, _collect(fuzzed_zips(base, header_ranges(base)), examples, seed))


def run(examples: int = 1000, mutation_examples: int = 3000) -> Tally:
    tally = Tally()
    fuzz_configs(tally, examples)
    fuzz_states(tally, examples)
    fuzz_metrics(tally, examples)
    fuzz_filenames(tally, max(50, examples // 4))
    fuzz_mutations(tally, mutation_examples)
    fuzz_pickles(tally, examples)
    fuzz_zips(tally, examples)
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
