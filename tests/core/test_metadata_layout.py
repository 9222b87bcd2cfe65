"""File layouts: ``nested`` (``{"state_dict": payload, "metadata": ...}``) and ``flat`` (payload keys at the top)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckptfn
from ckptfn import CheckpointError, PayloadError
from ckptfn.io.write import write_snapshot
from ckptfn.kit import Target
from ckptfn.core.metadata import FORMAT, compose, decompose

keys = st.text(min_size=1, max_size=8).filter(lambda k: k != "metadata")
payloads = st.dictionaries(keys, st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3), max_leaves=5), max_size=5)


@given(payloads, st.sampled_from(["nested", "flat"]))
def test_compose_then_decompose_gives_back_payload_and_metadata(payload, layout):
    metadata = {"format": FORMAT, "epoch": 1} | ({"layout": "flat"} if layout == "flat" else {})
    stored = compose(payload, metadata)
    assert decompose(stored) == (payload, metadata)
    expected_keys = set(payload) if layout == "flat" else {"state_dict"}
    assert stored["metadata"] == metadata and set(stored) == expected_keys | {"metadata"}


@pytest.mark.parametrize(
    "payload, layout, error",
    [
        ([1, 2], "flat", "payload: the flat layout needs a mapping, got list"),
        ({1: "x"}, "flat", "payload: keys must be str in the flat layout, got int 1"),
        ({"metadata": {}}, "flat", "payload['metadata']: this top-level key holds ckptfn's metadata"),
    ],
)
def test_flat_payloads_must_be_str_keyed_mappings_without_metadata(payload, layout, error):
    with pytest.raises(PayloadError) as info:
        compose(payload, {"format": FORMAT, "layout": layout})
    assert str(info.value).startswith(error)
    with pytest.raises(ValueError, match="'sideways' is not one of 'nested', 'flat'"):
        compose({}, {"format": FORMAT, "layout": "sideways"})


@pytest.mark.parametrize(
    "loaded",
    [
        {"state_dict": {}, "metadata": {"format": FORMAT}, "epoch": 3},  # nested with extra keys
        {"state_dict": {}, "metadata": {"format": "other/1", "layout": "flat"}},
        {"state_dict": {}, "metadata": "ckptfn/1"},
        [{"metadata": {"format": FORMAT}}],
    ],
)
def test_decompose_refuses_what_is_not_a_ckptfn_checkpoint(loaded):
    assert decompose(loaded) is None


def test_a_flat_file_reads_with_torch_and_with_ckptfn(tmp_path):
    weights = {"layer.weight": torch.randn(3, 2)}
    lightning_like = {"epoch": 4, "global_step": 40, "state_dict": weights, "optimizer_states": [{"state": {}}]}
    metadata = {"format": FORMAT, "epoch": 4, "saves": [], "layout": "flat"}
    (path,) = write_snapshot(tmp_path, [Target("best.ckpt")], lightning_like, metadata)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "global_step", "state_dict", "optimizer_states", "metadata"}
    assert torch.equal(raw["state_dict"]["layer.weight"], weights["layer.weight"])
    payload, meta = ckptfn.load_checkpoint(path)
    assert set(payload) == set(lightning_like) and payload["global_step"] == 40 and meta == metadata
    assert ckptfn.read_metadata(path) == metadata


def test_a_nested_file_with_extra_top_level_keys_is_still_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": {}, "metadata": {"format": FORMAT}, "extra": 1}, path)
    with pytest.raises(CheckpointError, match="not a ckptfn checkpoint"):
        ckptfn.load_checkpoint(path)
