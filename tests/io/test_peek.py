"""Reading metadata without torch: the allow-listed unpickler agrees with torch's safe loader."""

from __future__ import annotations

import collections
import io
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptfn
from ckptfn.core.metadata import RESERVED_KEYS
from ckptfn.io.peek import ALLOWED_GLOBALS, peek_metadata
from tests.faults import RunsACommand


def test_every_allowed_global_is_one_torch_allows_under_weights_only():
    from torch._weights_only_unpickler import _get_allowed_globals

    assert ALLOWED_GLOBALS <= set(_get_allowed_globals())


tensors = st.sampled_from(
    [
        lambda: torch.randn(3, 2),
        lambda: torch.arange(5, dtype=torch.int64),
        lambda: torch.zeros(2, dtype=torch.bfloat16),
        lambda: torch.ones(2, dtype=torch.float16),
        lambda: torch.tensor([True, False]),
        lambda: torch.complex(torch.ones(2), torch.zeros(2)),
        lambda: torch.nn.Parameter(torch.ones(2)),
        lambda: torch.zeros(3, 3).to_sparse(),
        lambda: torch.randn(4)[::2],
    ]
).map(lambda make: make())
leaves = st.one_of(
    tensors,
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.binary(min_size=1, max_size=5),  # b'' is refused (see tests/io/test_payload.py)
    st.none(),
    st.sampled_from([torch.float32, torch.device("cpu"), torch.Size([2, 3]), {1, 2}, 1 + 2j]),
)
payloads = st.recursive(
    leaves,
    lambda inner: st.dictionaries(st.text(max_size=4), inner, max_size=4)
    | st.lists(inner, max_size=3)
    | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3).map(collections.OrderedDict),
    max_leaves=10,
)


@settings(max_examples=40, deadline=None)
@given(
    payload=payloads,
    value=st.floats(-1e6, 1e6),
    extra=st.dictionaries(
        st.text(max_size=5).filter(lambda key: key not in RESERVED_KEYS), st.integers() | st.text(max_size=5), max_size=3
    ),
)
def test_peek_reads_exactly_what_torch_reads(tmp_path_factory, payload, value, extra):
    directory = tmp_path_factory.mktemp("peek")
    manager = ckptfn.CheckpointManager(directory, [{"metric_name": "m", "filename": "a.pt"}])
    manager.update({"m": value}, {"model": payload}, 3)
    manager.save_checkpoint({"model": payload}, "b.pt", metadata=extra)
    for name in ("a.pt", "b.pt"):
        peeked = peek_metadata(directory / name)
        assert peeked is not None
        assert peeked == torch.load(directory / name, weights_only=True)["metadata"]


def test_a_module_state_dict_with_its_version_metadata(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("m")), {"m": 1.0})
    (path,) = ckptfn.execute(actions, {"model": model.state_dict()}, tmp_path, state=state)
    assert peek_metadata(path) == torch.load(path, weights_only=True)["metadata"]


class Allowed:
    """A class the user allowed for weights_only loading; the peek reader does not know it."""

    def __init__(self, x=1):
        self.x = x


def test_an_unknown_global_makes_it_give_up_and_torch_decides(tmp_path):
    torch.serialization.add_safe_globals([Allowed])
    try:
        state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("m")), {"m": 1.0})
        (path,) = ckptfn.execute(actions, {"thing": Allowed()}, tmp_path, state=state)
        assert peek_metadata(path) is None
        assert ckptfn.read_metadata(path)["epoch"] == 0  # via torch's weights_only loader
    finally:
        torch.serialization.clear_safe_globals()


class CallsTorchLoad:
    def __reduce__(self):
        return (torch.load, ("/nonexistent",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("evil", ["torch.load", "os.system"])
def test_a_hostile_pickle_is_never_run_by_the_peek_reader(tmp_path, evil):
    marker = tmp_path / "ran"
    payload = CallsTorchLoad() if evil == "torch.load" else RunsACommand(marker)
    buffer = io.BytesIO()
    torch.save({"state_dict": payload, "metadata": {"format": "ckptfn/1", "saves": []}}, buffer)
    path = tmp_path / "evil.pt"
    path.write_bytes(buffer.getvalue())
    assert peek_metadata(path) is None
    with pytest.raises(ckptfn.CheckpointError):
        ckptfn.read_metadata(path)
    assert not marker.exists()


def test_archives_without_exactly_one_data_pickle_are_refused(tmp_path):
    path = tmp_path / "two.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/data.pkl", pickle.dumps({"metadata": {}}, protocol=2))
        archive.writestr("a/version", "3\n")
        archive.writestr("b/data.pkl", pickle.dumps({"metadata": {}}, protocol=2))
    with pytest.raises(ckptfn.CheckpointError, match="'b/data.pkl' is not inside 'a/'"):
        peek_metadata(path)


def test_import_and_inspect_need_no_torch(tmp_path):
    state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("m", filename="best.pt")), {"m": 0.5})
    ckptfn.execute(actions, {"w": torch.ones(4)}, tmp_path, state=state)
    code = (
        "import sys, ckptfn\n"
        "assert 'torch' not in sys.modules, 'import ckptfn imported torch'\n"
        "from ckptfn.cli.main import main\n"
        f"assert main(['inspect', {str(tmp_path)!r}]) == 0\n"
        "assert ckptfn.read_metadata(" + repr(str(tmp_path / "best.pt")) + ")['saves'][0]['value'] == 0.5\n"
        "assert 'torch' not in sys.modules, 'inspect imported torch'\n"
        "ckptfn.CheckpointManager  # names that write checkpoints import torch on first use\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "best.pt" in result.stdout


# --- the scan: what torch would do on a pickle's say-so is refused, plain data passes ----------------

from ckptfn.io.peek import scan  # noqa: E402
from tests.reliability import hostile  # noqa: E402


@pytest.mark.parametrize("protocol", [0, 3, 4, 5])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_with_opcodes_torch_does_not_read_are_refused(protocol):
    data = pickle.dumps({"state_dict": {}, "metadata": {"format": "ckptfn/1", "b": b"x"}}, protocol=protocol)
    with pytest.raises(ckptfn.CheckpointError, match="is not one torch's weights_only loader reads"):
        scan(data, "best.pt: data.pkl")
    with pytest.raises(Exception):  # torch refuses them too: the scan keeps read_metadata and load_checkpoint agreed
        torch.load(io.BytesIO(hostile.with_pickle(data)), weights_only=True)


@pytest.mark.parametrize(
    "raw, refused",
    [
        (b"c__builtin__\nbytearray\nX\x02\x00\x00\x00abX\x07\x00\x00\x00latin-1\x86R", None),
        (b"c__builtin__\nbytearray\n)R", None),
        (hostile.bytearray_call(3 << 30), r"builtins\.bytearray\(int 3221225472\)"),
        (b"c_codecs\nencode\nX\x02\x00\x00\x00abX\x05\x00\x00\x00rot13\x86R", r"_codecs\.encode\(str 'ab', str 'rot13'\)"),
        (b"c__builtin__\ncomplex\nX\x04\x00\x00\x001+2j\x85R", r"builtins\.complex\(str '1\+2j'\)"),
        (b"c__builtin__\nset\nJ\x00\x00\x00\x40\x85R", r"builtins\.set\(int 1073741824\)"),
        (b"ctorch\nFloatTensor\n" + hostile.long1(2**31) + b"\x85R", r"torch\.FloatTensor\(int 2147483648\)"),
        (hostile.declared(b"\x8e", 3 << 30), r"opcode b'\\x8e' at offset \d+ is not one"),
        (b"X\xff\xff\xff\x7fabc", "the pickle has no STOP opcode"),
    ],
    ids=["bytearray(bytes)", "bytearray()", "bytearray(3 GiB)", "encode rot13", "complex(str)", "set(int)",
         "FloatTensor(2**31)", "BINBYTES8 3 GiB", "BINUNICODE past the end"],
)
def test_plain_constructors_only_in_the_forms_pickle_writes(raw, refused):
    data = hostile.in_metadata(raw)
    if refused is None:
        assert scan(data, "x").loaded["metadata"]["x"] in (bytearray(b"ab"), bytearray())
    else:
        with pytest.raises(ckptfn.CheckpointError, match="refused: " + refused):
            scan(data, "best.pt: data.pkl")


def test_the_placeholders_check_tensors_against_their_records(tmp_path):
    path = tmp_path / "best.pt"
    for variant, message in [
        ("a storage claiming 2**31 elements of a 64-byte record", "claims 2147483648 elements of 4 bytes; its record holds 64 bytes"),
        ("a tensor reaching past its storage", r"size \(16,\) at offset 10 needs 26 elements; its storage has 16"),
        ("a quantized tensor of 2**31 elements on a 64-byte storage", "a quantized tensor: size"),
    ]:
        path.write_bytes(hostile.allocation_variants()[variant])
        with pytest.raises(ckptfn.CheckpointError, match=message):
            peek_metadata(path)
        with pytest.raises(ckptfn.CheckpointError, match=message):
            ckptfn.load_checkpoint(path)  # refused before torch allocates (2**31 elements for the quantized one)


def test_a_foreign_global_does_not_stop_the_scan(tmp_path):
    # before, the reader gave up at the first unknown global and torch's loader ran the rest (bytearray(N))
    raw = b"ctests.io.test_peek\nAllowed\n)R" + hostile.bytearray_call(1 << 30) + b"\x86"
    with pytest.raises(ckptfn.CheckpointError, match="bytearray"):
        scan(hostile.in_metadata(raw), "x")
    scanned = scan(hostile.in_metadata(b"ctests.io.test_peek\nAllowed\n)R"), "x")
    assert scanned.foreign == ["tests.io.test_peek.Allowed"]


def test_the_scan_is_linear_and_small_on_a_big_real_pickle():
    import time

    state = {f"layer{i}.weight": torch.zeros(2) for i in range(3000)}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "metadata": {"format": "ckptfn/1"}}, buffer)
    archive = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    data = archive.read([n for n in archive.namelist() if n.endswith("data.pkl")][0])
    records = {n.rsplit("/", 1)[1]: archive.getinfo(n).file_size for n in archive.namelist() if "/data/" in n}
    started = time.perf_counter()
    scanned = scan(data, "x", records)
    assert time.perf_counter() - started < 1.0 and not scanned.foreign and len(scanned.loaded["state_dict"]) == 3000


# --- found by the full-size fuzzer: a torch.Size that torch's loader refuses ----------------------


@pytest.mark.parametrize(
    "spelled",
    [b"K\x03\x85q\x05R", b"\x8a\x09\x01\x00\x00\x00\x00\x00\x00\x80\x00\x85q\x05\x85q\x06R"],
    ids=["Size(3)", "Size((2**63 + 1,))"],
)
def test_a_size_torch_cannot_build_is_refused_as_torch_refuses_it(tmp_path, spelled):
    """``torch.Size(3)`` (an int, not a sequence) and a size beyond 64 bits: torch's loader fails on them,
    so read_metadata (and so resume) must refuse them too, never vouch for a file that cannot load."""
    import io as _io
    import zipfile

    from tests.reliability.hostile import replace_member

    buffer = _io.BytesIO()
    torch.save({"state_dict": {"shape": torch.Size([3])}, "metadata": {"format": "ckptfn/1", "saves": []}}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
        pickled = archive.read(member)
    spelling = b"K\x03\x85q\x05\x85q\x06R"  # how pickle spells Size((3,)), memo puts included
    assert spelling in pickled
    path = tmp_path / "odd.pt"
    path.write_bytes(replace_member(buffer.getvalue(), "data.pkl", pickled.replace(spelling, spelled)))
    with pytest.raises(ckptfn.CheckpointError):
        ckptfn.load_checkpoint(path)
    with pytest.raises(ckptfn.CheckpointError, match="torch.Size"):
        ckptfn.read_metadata(path)
