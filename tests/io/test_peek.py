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
from ckptfn.io.read import _torch_load
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
        assert peeked == _torch_load(directory / name, map_location="cpu", mmap=True)["metadata"]


def test_a_module_state_dict_with_its_version_metadata(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    state, actions = ckptfn.step(ckptfn.init(ckptfn.Strategy("m")), {"m": 1.0})
    (path,) = ckptfn.execute(actions, {"model": model.state_dict()}, tmp_path, state=state)
    assert peek_metadata(path) == _torch_load(path, mmap=True)["metadata"]


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


def test_archives_without_exactly_one_data_pickle_give_up(tmp_path):
    path = tmp_path / "two.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/data.pkl", pickle.dumps({"metadata": {}}, protocol=2))
        archive.writestr("b/data.pkl", pickle.dumps({"metadata": {}}, protocol=2))
    assert peek_metadata(path) is None


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
