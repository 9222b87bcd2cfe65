"""Reading checkpoints: safe loading only, clear errors for every kind of bad file."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch

import ckptfn
from ckptfn import CheckpointError, CheckpointNotFoundError, Strategy, execute, init, load_checkpoint, read_metadata, step
from tests.faults import RunsACommand


@pytest.fixture
def good(tmp_path):
    state, actions = step(init(Strategy("val_loss", filename="best_loss.pt")), {"val_loss": 0.5})
    (path,) = execute(actions, {"w": torch.randn(64, 64)}, tmp_path, state=state)
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["raw pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    evil = {"state_dict": RunsACommand(marker), "metadata": {"format": "ckptfn/1"}}
    if how == "raw pickle":
        path.write_bytes(pickle.dumps(evil))
    else:
        torch.save(evil, path)
    for reader in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointError, match="cannot be loaded safely|not a torch zip archive") as info:
            reader(path)
        assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_files_are_checkpoint_errors(good, tmp_path, fraction):
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    for reader in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointError) as info:
            reader(cut)
        assert str(cut) in str(info.value)


def test_random_bytes_and_empty_files(tmp_path):
    for name, content in [("empty.pt", b""), ("noise.pt", os.urandom(4096)), ("text.pt", b"hello")]:
        path = tmp_path / name
        path.write_bytes(content)
        for reader in (load_checkpoint, read_metadata):
            with pytest.raises(CheckpointError, match=name):
                reader(path)


def test_a_plain_torch_save_file_is_not_a_ckptfn_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    for reader in (load_checkpoint, read_metadata):
        with pytest.raises(CheckpointError, match="not a ckptfn checkpoint"):
            reader(path)
    torch.save({"state_dict": {}, "metadata": {"format": "other/2"}}, path)
    with pytest.raises(CheckpointError, match="not a ckptfn checkpoint"):
        load_checkpoint(path)


def test_missing_file_lists_what_the_directory_holds(good):
    missing = good.parent / "best_corr.pt"
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointError)
    assert str(missing) in str(info.value) and "best_loss.pt" in str(info.value)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        read_metadata(good.parent / "nowhere" / "x.pt")


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_read_metadata_matches_load_and_map_location(good):
    state_dict, meta = load_checkpoint(good, map_location="cpu")
    assert read_metadata(good) == meta
    assert state_dict["w"].device.type == "cpu"


@pytest.mark.filterwarnings("ignore::ckptfn.MetricWarning")
def test_restore_from_directory_trusts_the_files(tmp_path):
    config = ckptfn.Config([Strategy("val_loss", filename="best_loss.pt"), Strategy("val_corr", mode="max", filename="best_corr.pt"),
                            Strategy("mse", filename="best_mse.pt")], on_missing="warn")
    state = init(config)
    for epoch, metrics in enumerate([{"val_loss": 1.0, "val_corr": 0.1}, {"val_loss": 0.5, "val_corr": 0.05}]):
        state, actions = step(state, metrics)
        execute(actions, {}, tmp_path, state=state)
    (tmp_path / "best_mse.pt").write_bytes(b"garbage")
    with pytest.raises(ckptfn.CheckpointError, match=r"cannot judge the checkpoint at a watched name.*best_mse.pt"):
        ckptfn.restore_from_directory(config, tmp_path)  # a file that cannot be judged is never "absent"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = ckptfn.restore_from_directory(config, tmp_path, unreadable="warn")
    assert ckptfn.best_values(resumed) == {"best_loss.pt": 0.5, "best_corr.pt": 0.1, "best_mse.pt": None}
    assert [b.epoch for b in resumed.bests] == [1, 0, None]
    assert resumed.steps == 2
    assert any("best_mse.pt" in str(w.message) for w in caught)
    # a changed mode under the same file name starts fresh
    flipped = ckptfn.Config([Strategy("val_loss", mode="max", filename="best_loss.pt")])
    assert ckptfn.best_values(ckptfn.restore_from_directory(flipped, tmp_path)) == {"best_loss.pt": None}


# --- zip structure: read_metadata accepts a file only if load_checkpoint loads it -----------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.reliability import hostile  # noqa: E402
from tests.reliability.common import in_child  # noqa: E402

GOOD = hostile.good_bytes(elements=64, saves=[hostile.BEST_ENTRY])
VARIANTS = hostile.zip_variants(GOOD)
HARMLESS = {"a zip comment (harmless: torch loads it)"}
#: The damage that read_metadata (and so resume) accepted before headers were checked.
ONCE_ACCEPTED = {
    "two damaged bytes in a tensor record's local header (signature)", "two damaged bytes in a tensor record's local name",
    "a wrong name in a local header", "local header sizes disagree with the central directory",
    "local header says deflated", "local extra field runs into the next member", "garbage appended",
    "overlapping members", "duplicate names", "missing version record", "version record out of torch's range",
    "byteorder record garbled", "the end record's directory offset points past the end", "a member marked as a directory",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_damaged_zip_structure_is_refused_by_every_reader_naming_the_file(tmp_path, variant):
    path = tmp_path / "best.pt"
    path.write_bytes(VARIANTS[variant])
    if variant in HARMLESS:
        assert read_metadata(path) == load_checkpoint(path)[1]
        return
    for reader in (read_metadata, load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            reader(path)
        assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match=r"cannot judge the checkpoint at a watched name.*best\.pt"):
        ckptfn.CheckpointManager(tmp_path, [{"metric_name": "val_loss", "filename": "best.pt"}], resume=True)


def test_the_damage_read_metadata_once_accepted_names_the_member(tmp_path):
    # read_metadata (and resume=True) accepted 14 of these variants although load_checkpoint refuses most
    # and loads others wrongly (overlapping members: another record's bytes): the run ended without a
    # loadable best. Now every one is refused from its headers, naming what is wrong.
    path = tmp_path / "best.pt"
    expected = {
        "two damaged bytes in a tensor record's local header (signature)": "'archive/data/0': its local header at offset",
        "a wrong name in a local header": "'archive/data/0': its local header names it 'archive/data/9'",
        "local header sizes disagree with the central directory": "'archive/data/0': its local header declares 99 bytes",
        "overlapping members": "'archive/data/1': its local header names it 'archive/data/0'",
        "duplicate names": "'archive/data/0' appears twice",
        "missing version record": "no archive/version record",
        "garbage appended": "no end of central directory record ends the file",
    }
    assert set(expected) <= ONCE_ACCEPTED
    for variant, message in expected.items():
        path.write_bytes(VARIANTS[variant])
        with pytest.raises(CheckpointError, match="damaged zip archive") as info:
            read_metadata(path)
        assert message in str(info.value), variant
    import io
    import zipfile

    tensor = zipfile.ZipFile(io.BytesIO(GOOD)).getinfo("archive/data/0")
    path.write_bytes(hostile.claim_size(GOOD, "data/0", tensor.file_size + 50))  # both headers agree; the data overlaps
    with pytest.raises(CheckpointError, match="zip members 'archive/data/0' and 'archive/data/1' overlap"):
        read_metadata(path)


def _header_ranges():
    from tests.reliability.fuzz import header_ranges

    return header_ranges(GOOD)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_flipped_header_bytes_are_read_only_if_the_file_loads(tmp_path_factory, data):
    """Property: for any bytes flipped inside the zip headers of a real checkpoint, read_metadata
    accepts the file only if load_checkpoint loads it (resume never trusts a best it cannot load)."""
    damaged = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 3))):
        start, end = data.draw(st.sampled_from(_HEADERS))
        damaged[data.draw(st.integers(start, end - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path_factory.mktemp("flip") / "best.pt"
    path.write_bytes(bytes(damaged))
    try:
        metadata = read_metadata(path)
    except CheckpointError as error:
        assert str(path) in str(error)
        return
    assert load_checkpoint(path)[1] == metadata


_HEADERS = _header_ranges()


@pytest.mark.parametrize("how", ["zip64 records for every member", "no data descriptors", "data descriptors"])
def test_archives_other_writers_produce_are_read_like_torch_reads_them(tmp_path, how):
    import io
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(GOOD))
    out = io.BytesIO()

    class Unseekable(io.RawIOBase):  # zipfile then writes data descriptors
        def writable(self):
            return True

        def write(self, chunk):
            return out.write(chunk)

    with zipfile.ZipFile(Unseekable() if how == "data descriptors" else out, "w") as archive:
        for info in source.infolist():
            with archive.open(zipfile.ZipInfo(info.filename), "w", force_zip64=how.startswith("zip64")) as member:
                member.write(source.read(info))
    path = tmp_path / "best.pt"
    path.write_bytes(out.getvalue())
    assert read_metadata(path) == load_checkpoint(path)[1] == torch.load(path, weights_only=True)["metadata"]


# --- metadata and pickles that never end or ask for memory: documented errors, bounded ------------


@pytest.mark.parametrize("variant", sorted(hostile.endless_variants()))
def test_metadata_that_never_ends_is_refused_at_once(tmp_path, variant):
    # read_metadata hung (80 levels of shared lists: 2**80 values walked) or raised RecursionError
    # (cyclic, 100,000 deep); load_checkpoint returned them, and the next walk (inspect, json) hung
    path = tmp_path / "best.pt"
    path.write_bytes(hostile.endless_variants()[variant])
    for reader in (read_metadata, load_checkpoint):
        outcome, message = in_child(_timed, reader, str(path), timeout=20)
        assert outcome == "ok", message
        kind, text, seconds = message
        assert kind == "CheckpointError" and str(path) in text and "refused: metadata" in text, text
        assert seconds < 2.0


def _timed(reader, path):
    import time

    started = time.monotonic()
    try:
        reader(path)
    except Exception as error:  # noqa: BLE001 - the child reports what was raised
        return [type(error).__name__, str(error), time.monotonic() - started]
    return ["returned", "", time.monotonic() - started]


def test_the_shared_list_file_is_refused_naming_the_key_in_milliseconds(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(hostile.torch_saved(x=hostile.shared_lists(80)))
    assert path.stat().st_size < 4096
    outcome, (kind, text, seconds) = in_child(_timed, read_metadata, str(path), timeout=20)
    assert kind == "CheckpointError" and seconds < 0.1
    assert "metadata['x']: more than 1000000 values" in text


@pytest.mark.parametrize("variant", sorted(hostile.allocation_variants()))
def test_a_pickle_that_asks_for_memory_is_refused_before_anything_is_allocated(tmp_path, variant):
    # bytearray(3 GiB) in a 1 KB file: read_metadata allocated it twice (9-14 s, 3.2 GiB) and returned
    path = tmp_path / "best.pt"
    path.write_bytes(hostile.allocation_variants()[variant])
    for reader in (read_metadata, load_checkpoint):
        outcome, (kind, text, seconds, grown) = in_child(_measured, reader, str(path), timeout=20)
        assert kind == "CheckpointError" and str(path) in text and "data.pkl: refused" in text, text
        assert seconds < 1.0 and grown < 32, (seconds, grown)


def _measured(reader, path):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kind, text, seconds = _timed(reader, path)
    return [kind, text, seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024]


def test_a_file_the_allow_listed_reader_cannot_vouch_for_is_still_vetted_before_torch_reads_it(tmp_path):
    # a foreign global sends the file to torch's loader; a bytearray(N) later in the pickle must not
    raw = b"ctests.io.test_read\nForeign\n)R" + hostile.bytearray_call(3 << 30) + b"\x86"
    path = tmp_path / "best.pt"
    path.write_bytes(hostile.with_pickle(hostile.in_metadata(raw)))
    for reader in (read_metadata, load_checkpoint):
        with pytest.raises(CheckpointError, match=r"data\.pkl: refused: builtins\.bytearray\(int 3221225472\)"):
            reader(path)
