"""Verifying checkpoints: every flipped bit in data or headers is found, intact files always pass.

torch writes a CRC32 of every zip record but never checks one: these tests flip
bits in real checkpoints and show that torch loads the damage silently while
``verify_checkpoint`` names the record it hit.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfn
from ckptfn import CheckpointError, CheckpointNotFoundError, Strategy
from ckptfn.io import verify as verify_module
from ckptfn.io.dcp import _dcp
from ckptfn.io.verify import LEVELS, Verdict, checkpoints_in, verify_checkpoint, verify_checkpoints

REPO = pathlib.Path(__file__).resolve().parents[2]
LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def save(directory: pathlib.Path, payload: dict, **options) -> pathlib.Path:
    """One checkpoint of ``payload`` written by a ``CheckpointManager`` into ``directory``."""
    manager = ckptfn.CheckpointManager(directory, [Strategy("val_loss")], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's single-process warning
        (path,) = manager.update({"val_loss": 0.5}, payload, 0)
    return path


def rewrite(path: pathlib.Path, data: bytes, directory: str) -> pathlib.Path:
    target = pathlib.Path(directory, path.name)
    target.write_bytes(data)
    return target


@dataclasses.dataclass(frozen=True)
class Record:
    """Where one zip record's parts lie in a checkpoint file."""

    name: str
    header: int  # offset of the local header
    name_end: int  # end of the local header's name
    data: int  # first byte of the data
    size: int
    descriptor: int | None  # offset of the data descriptor (16 bytes), if any


def records_of(data: bytes) -> list[Record]:
    found = []
    for member in zipfile.ZipFile(io.BytesIO(data)).infolist():
        fields = LOCAL_HEADER.unpack_from(data, member.header_offset)
        name_end = member.header_offset + LOCAL_HEADER.size + fields[9]
        start = name_end + fields[10]
        end = start + member.compress_size
        found.append(Record(member.filename, member.header_offset, name_end, start, member.file_size,
                            end if member.flag_bits & 0x08 else None))
    return found


def central_fields(data: bytes) -> list[int]:
    """Offsets of the bytes of the central directory entries that a reader relies on: signature,
    version needed, flags, method, time, date, CRC32, sizes, name length, header offset, name."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    position, positions = archive.start_dir, []
    for _ in archive.infolist():
        name_length, extra_length, comment_length = struct.unpack_from("<3H", data, position + 28)
        kept = [*range(0, 4), *range(6, 30), *range(42, 46), *range(46, 46 + name_length)]
        positions += [position + offset for offset in kept]
        position += 46 + name_length + extra_length + comment_length
    return positions


PAYLOAD = {
    "weight": torch.randn(40, 25, generator=torch.Generator().manual_seed(0)),
    "steps": torch.arange(7, dtype=torch.int64),
    "mask": torch.arange(64, dtype=torch.uint8),
    "note": "a string value",
}


@functools.cache
def reference() -> bytes:
    """A real checkpoint's bytes (tensors of three dtypes, no empty record)."""
    with tempfile.TemporaryDirectory() as directory:
        return save(pathlib.Path(directory), PAYLOAD).read_bytes()


def flipped(data: bytes, offset: int, bit: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 1 << bit
    return bytes(changed)


def verify_bytes(data: bytes, level: str = "full") -> Verdict:
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory, "best_val_loss.pt")
        path.write_bytes(data)
        return verify_checkpoint(path, level=level)


# --- intact files -------------------------------------------------------------------------------


def test_an_intact_checkpoint_is_ok_at_both_levels(tmp_path):
    path = save(tmp_path, PAYLOAD)
    full = verify_checkpoint(path)
    assert full.ok and full.problems == () and full.notes == ()
    assert full.checked == ("structure", "crc32", "read", "load") and full.level == "full"
    assert full.records == len(zipfile.ZipFile(path).infolist())
    assert full.bytes_read == sum(member.file_size for member in zipfile.ZipFile(path).infolist())
    structure = verify_checkpoint(path, level="structure")
    assert structure.ok and structure.checked == ("structure",) and structure.bytes_read == 0


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool,
          torch.complex64]


@st.composite
def payloads(draw) -> dict:
    tensors = {}
    for index in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**31))
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 50
        tensors[f"t{index}"] = values.to(dtype)
    extras = draw(st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(st.integers(), st.text(max_size=20)),
                                  max_size=3))
    return {"tensors": tensors, "extras": extras}


@settings(max_examples=40)
@given(payloads(), st.booleans())
def test_intact_checkpoints_of_any_payload_are_ok(payload, checksums):
    with tempfile.TemporaryDirectory() as directory:
        path = save(pathlib.Path(directory), payload, checksums=checksums)
        for level in LEVELS:
            verdict = verify_checkpoint(path, level=level)
            assert verdict.ok, verdict.problems
            assert verdict.ok == (verdict.problems == ())


# --- flipped bits -------------------------------------------------------------------------------


def data_records() -> list[Record]:
    return [record for record in records_of(reference()) if "/data/" in record.name and record.size]


@settings(max_examples=80)
@given(st.data())
def test_a_flipped_bit_in_tensor_data_is_found_though_torch_loads_it_silently(data):
    record = data.draw(st.sampled_from(data_records()), label="record")
    position = data.draw(st.integers(0, record.size * 8 - 1), label="bit")
    damaged = flipped(reference(), record.data + position // 8, position % 8)
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory, "best_val_loss.pt")
        path.write_bytes(damaged)
        loaded = torch.load(path, weights_only=True)  # the class of bug: torch loads it without a word
        changed = [key for key, tensor in PAYLOAD.items() if isinstance(tensor, torch.Tensor)
                   and bytes(loaded["state_dict"][key].numpy().tobytes()) != bytes(tensor.numpy().tobytes())]
        assert len(changed) == 1
        assert verify_checkpoint(path, level="structure").ok  # the cheap level cannot see data
        verdict = verify_checkpoint(path)
    assert not verdict.ok
    (problem,) = verdict.problems
    assert problem.startswith(f"{record.name!r}: CRC32 mismatch") and f"at offset {record.data}" in problem


def header_positions() -> list[int]:
    data = reference()
    positions = []
    for record in records_of(data):
        positions += range(record.header, record.name_end)  # the local header's fields and name
        if record.descriptor is not None:
            positions += range(record.descriptor, record.descriptor + 16)
    return sorted(set(positions + central_fields(data)))


@settings(max_examples=150)
@given(st.data())
def test_a_flipped_bit_in_a_header_is_found(data):
    offset = data.draw(st.sampled_from(header_positions()), label="offset")
    bit = data.draw(st.integers(0, 7), label="bit")
    verdict = verify_bytes(flipped(reference(), offset, bit))
    assert not verdict.ok and verdict.problems


def test_local_header_disagreements_name_the_field():
    data = reference()
    record = records_of(data)[0]
    verdict = verify_bytes(flipped(data, record.header + 10, 0))  # the time field
    assert not verdict.ok
    assert any(f"{record.name!r}: the local header at offset {record.header} has date and time" in problem
               for problem in verdict.problems)


def test_a_central_crc_flip_is_a_mismatch_of_that_record():
    data = reference()
    archive = zipfile.ZipFile(io.BytesIO(data))
    first = archive.infolist()[0]
    verdict = verify_bytes(flipped(data, archive.start_dir + 16, 3))  # the first entry's CRC32
    assert any(problem.startswith(f"{first.filename!r}: CRC32 mismatch") for problem in verdict.problems)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 0.99])
def test_truncated_files_are_damaged_at_both_levels(fraction):
    data = reference()
    for level in LEVELS:
        verdict = verify_bytes(data[: int(len(data) * fraction)], level)
        assert not verdict.ok and verdict.problems


def test_checksums_false_files_are_read_but_not_data_checkable(tmp_path):
    path = save(tmp_path, PAYLOAD, checksums=False)
    verdict = verify_checkpoint(path)
    assert verdict.ok and verdict.records == 0 and "crc32" not in verdict.checked
    assert verdict.checked == ("structure", "read", "load") and verdict.bytes_read > 0
    (note,) = verdict.notes
    assert "without checksums" in note and "cannot be checked" in note
    # The limitation itself: a flipped data bit in such a file cannot be seen.
    record = next(r for r in records_of(path.read_bytes()) if "/data/" in r.name)
    assert verify_bytes(flipped(path.read_bytes(), record.data, 0)).ok


def test_a_foreign_torch_file_is_not_a_ckptfn_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(3)}, path)
    verdict = verify_checkpoint(path)
    assert not verdict.ok and "not a ckptfn checkpoint" in verdict.problems[0]


@pytest.mark.parametrize("content", [b"", b"hello", os.urandom(4096)])
def test_non_archives_are_damaged(tmp_path, content):
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    for level in LEVELS:
        verdict = verify_checkpoint(path, level=level)
        assert not verdict.ok and str(path) not in verdict.problems[0]


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "best.pt"
    os.mkfifo(fifo)
    verdict = verify_checkpoint(fifo)
    assert not verdict.ok and "not a regular file" in verdict.problems[0]
    assert checkpoints_in(tmp_path) == []


def test_missing_paths_and_unknown_levels_raise(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        verify_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="level"):
        verify_checkpoint(tmp_path, level="quick")
    with pytest.raises(ValueError, match="level"):
        list(verify_checkpoints([tmp_path], level="quick"))


def test_raise_error_names_every_problem(tmp_path):
    data = reference()
    record = data_records()[0]
    verdict = verify_bytes(flipped(data, record.data, 0))
    with pytest.raises(CheckpointError, match=rf"best_val_loss.pt: damaged: '{record.name}': CRC32 mismatch"):
        verdict.raise_error()


@settings(max_examples=50)
@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1))
def test_the_crc32_in_use_is_zlibs(data, start):
    from ckptfn.io import records

    assert records.crc32(data, start) == zlib.crc32(data, start)
    assert verify_module.CRC32_IMPLEMENTATION in ("zlib", "zlib-ng")


# --- sharded trees ------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    return save(tmp_path, {"w": torch.ones(8), "b": torch.zeros(1000), "count": 3}, sharded=True)


def shard_of(tree: pathlib.Path) -> pathlib.Path:
    (shard,) = tree.glob("*.distcp")
    return shard


def test_an_intact_tree_is_ok_at_both_levels(tree):
    full = verify_checkpoint(tree)
    assert full.ok, full.problems
    assert full.checked == ("structure", "crc32", "read", "load") and full.records > 0
    assert 4000 + 32 <= full.bytes_read < shard_of(tree).stat().st_size  # the records' bytes, not their headers
    structure = verify_checkpoint(tree, level="structure")
    assert structure.ok and structure.checked == ("structure",) and structure.bytes_read == 0


@pytest.mark.parametrize("cut", [1, 100, 0.5])
def test_a_truncated_shard_is_damaged_at_both_levels(tree, cut):
    shard = shard_of(tree)
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * cut)] if isinstance(cut, float) else data[:-cut])
    for level in LEVELS:
        verdict = verify_checkpoint(tree, level=level)
        assert not verdict.ok
        assert any(problem.startswith(f"'{shard.name}' record") and "beyond the end" in problem
                   for problem in verdict.problems)


def test_a_flipped_bit_in_a_shard_is_found_though_it_loads(tree):
    shard = shard_of(tree)
    data = bytearray(shard.read_bytes())
    data[data.index(bytes(4000)) + 1000] ^= 0x04
    shard.write_bytes(data)
    state_dict, _ = ckptfn.load_checkpoint(tree)
    assert state_dict["b"].count_nonzero() == 1  # loaded without a word
    assert verify_checkpoint(tree, level="structure").ok
    (problem,) = verify_checkpoint(tree).problems
    assert problem.startswith(f"'{shard.name}' record 'b' (bytes ") and "'archive/data/0': CRC32 mismatch" in problem


def test_a_missing_shard_is_damaged(tree):
    shard = shard_of(tree)
    shard.unlink()
    for level in LEVELS:
        assert f"'{shard.name}' (holding 3 records): missing" in verify_checkpoint(tree, level=level).problems


def test_a_shard_that_is_not_a_regular_file_is_damaged(tree):
    shard = shard_of(tree)
    shard.unlink()
    os.mkfifo(shard)
    assert f"'{shard.name}' (holding 3 records): not a regular file" in verify_checkpoint(tree).problems


def test_damaged_tree_metadata_is_found(tree):
    (tree / ".metadata").write_bytes(b"\x80\x04garbage")
    problems = verify_checkpoint(tree, level="structure").problems
    assert any(problem.startswith("'.metadata': cannot be read") for problem in problems)
    (tree / ".metadata").unlink()
    assert "no .metadata" in verify_checkpoint(tree).problems[0]


def test_missing_ckptfn_json_is_found(tree):
    (tree / "ckptfn.json").unlink()
    verdict = verify_checkpoint(tree, level="structure")
    assert not verdict.ok and "ckptfn.json" in verdict.problems[0]


def rewrite_storage(tree: pathlib.Path, change) -> None:
    """Rewrite DCP's .metadata with ``change(storage_info) -> storage_info`` applied to every record."""
    metadata = _dcp().reader(tree).read_metadata()
    metadata.storage_data = {key: change(info) for key, info in metadata.storage_data.items()}
    (tree / ".metadata").write_bytes(pickle.dumps(metadata))


def test_records_naming_files_outside_the_tree_are_damaged(tree, tmp_path):
    (tmp_path / "outside").write_bytes(shard_of(tree).read_bytes())
    rewrite_storage(tree, lambda info: dataclasses.replace(info, relative_path="../outside"))
    problems = verify_checkpoint(tree).problems
    assert "'../outside' (holding 3 records): DCP's .metadata names a file outside the checkpoint" in problems


def test_records_beyond_their_file_are_damaged_at_the_structure_level(tree):
    rewrite_storage(tree, lambda info: dataclasses.replace(info, length=info.length + 10**6))
    problems = verify_checkpoint(tree, level="structure").problems
    assert sum(f"'{shard_of(tree).name}' record" in p and "beyond the end" in p for p in problems) == 3


def test_malformed_extents_are_damaged_not_errors(tree):
    rewrite_storage(tree, lambda info: dataclasses.replace(info, offset="0"))
    for level in LEVELS:
        problems = verify_checkpoint(tree, level=level).problems
        assert sum("DCP's .metadata records a malformed extent ('0', " in problem for problem in problems) == 3


def test_values_without_storage_are_damaged(tree):
    metadata = _dcp().reader(tree).read_metadata()
    metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != "count"}
    (tree / ".metadata").write_bytes(pickle.dumps(metadata))
    problems = verify_checkpoint(tree, level="structure").problems
    assert "'count': DCP's .metadata records no storage for it" in problems


# --- directories --------------------------------------------------------------------------------


def test_a_directory_stands_for_its_checkpoints(tmp_path):
    save(tmp_path, PAYLOAD)
    save(tmp_path / "sharded", {"w": torch.ones(2)}, sharded=True).rename(tmp_path / "best_val_loss.dcp")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "weights.bin").write_bytes(reference())  # a zip archive, whatever its name
    (tmp_path / ".ckptfn.123.best_val_loss.pt.tmp").write_bytes(b"half written")
    (tmp_path / "old.ckpt").write_bytes(b"damaged")
    os.mkfifo(tmp_path / "pipe.pt")
    names = [path.name for path in checkpoints_in(tmp_path)]
    assert names == ["best_val_loss.dcp", "best_val_loss.pt", "old.ckpt", "weights.bin"]
    verdicts = {pathlib.Path(v.path).name: v.ok for v in verify_checkpoints([tmp_path])}
    assert verdicts == {"best_val_loss.dcp": True, "best_val_loss.pt": True, "old.ckpt": False, "weights.bin": True}


# --- memory -------------------------------------------------------------------------------------

CHILD = """
import json, sys
from ckptfn.io.verify import verify_checkpoint

def kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

verify_checkpoint(sys.argv[2])  # warm: imports, torch's loader
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the high-water mark starts again from the resident set now
before = kib("VmHWM")
verdict = verify_checkpoint(sys.argv[1])
print(json.dumps({"ok": verdict.ok, "bytes_read": verdict.bytes_read, "growth_kib": kib("VmHWM") - before}))
"""


# Not ru_maxrss: Linux carries the parent's resident set into it across fork and exec.
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets Linux's high-water mark (VmHWM)")
def test_memory_stays_bounded_for_a_256_mib_checkpoint(tmp_path):
    big = ckptfn.execute([ckptfn.Save(Strategy("val_loss", filename="big.pt"), 0, 0.5, None)],
                         {f"layer{i}": torch.ones(4, 2**22) for i in range(4)}, tmp_path)[0]
    small = save(tmp_path / "small", {"w": torch.ones(4)})
    result = subprocess.run([sys.executable, "-c", CHILD, str(big), str(small)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["ok"] and measured["bytes_read"] >= 256 * 2**20
    assert measured["growth_kib"] < 64 * 1024, measured  # the file is 256 MiB; the read buffer is 1 MiB
