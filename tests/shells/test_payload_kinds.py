"""Every tensor kind saves the same with ``async_save=True`` as without, or both modes refuse it.

The asynchronous path snapshots the payload into staging buffers before a
background thread writes it (ckptfn/io/staging.py); the synchronous path hands the
payload to ``torch.save`` as it is. Whatever the payload holds, the two files must
load the same: every storage's bits, strides and offsets, conj/neg bits,
coalescing, nested strides, quantization, ``requires_grad``, Python attributes and
which tensors share a storage (tests/shells/tensor_kinds.py compares all of it).
"""

from __future__ import annotations

import io
import pathlib
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import ckptfn
from ckptfn.io.staging import StagingBuffers

from tests.shells import tensor_kinds
from tests.shells.tensor_kinds import REGRESSIONS, nested_strided, save, sync_vs_async

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch's beta/prototype notices for these kinds


def test_a_strided_nested_tensor_saves_identically_with_async_save(tmp_path):
    # The reported bug: the snapshot took a nested tensor for a plain one and called .size() on it
    # (RuntimeError: NestedTensorImpl doesn't support sizes); the synchronous path saved it.
    payload = {"nested": nested_strided(), "w": torch.ones(2)}
    assert sync_vs_async(tmp_path, payload) is None
    loaded = ckptfn.load_checkpoint(tmp_path / "async" / "best_val_loss.pt")[0]["nested"]
    assert loaded.is_nested and [t.tolist() for t in loaded.unbind()] == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0, 4.0]]


@pytest.mark.parametrize("make", REGRESSIONS.values(), ids=REGRESSIONS.keys())
def test_tensor_kinds_the_snapshot_used_to_break_or_change_save_identically(tmp_path, make):
    assert sync_vs_async(tmp_path, {"x": make(), "epoch": 1}) is None


def test_a_tensor_torch_save_cannot_store_is_refused_before_anything_is_written(tmp_path):
    # An MKL-DNN tensor has no storage torch.save can write. The snapshot used to fail with torch's
    # NotImplementedError from deep inside deepcopy; now a PayloadError names the key.
    payload = {"model": {"w": torch.ones(2, 2).to_mkldnn()}}
    for mode in (True, False):  # both modes refuse it alike, before writing
        outcome, error = save(tmp_path / f"async-{mode}", payload, async_save=mode)
        assert outcome == "refused", error
        assert str(error).startswith("payload['model']['w']: an MKL-DNN tensor cannot be saved by torch.save")


def test_payloads_torch_save_refuses_are_payload_errors_naming_the_key_in_both_modes(tmp_path):
    """A storage seen as two dtypes (a complex tensor and its .imag) and a tensor attribute that does
    not load with weights_only: refused before anything is written, naming the keys, sync and async."""
    complex_weights = torch.randn(3, dtype=torch.complex64)
    with_function = torch.zeros(2)
    with_function.fn = print
    cases = {
        "payload['i']: views the same memory as payload['c']": {"c": complex_weights, "i": complex_weights.imag},
        "payload['t'].fn: builtins.builtin_function_or_method": {"t": with_function},
    }
    for index, (message, payload) in enumerate(cases.items()):
        for mode in (True, False):
            outcome, error = save(tmp_path / f"{index}-{mode}", payload, async_save=mode)
            assert outcome == "refused" and str(error).startswith(message), error


# --- the property, over payloads mixing many kinds ------------------------------------------------

PROPERTY = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(tensor_kinds.payloads())
def test_sync_and_async_saves_of_any_tensor_kinds_load_the_same_or_both_refuse(case):
    payload, kinds = case
    with tempfile.TemporaryDirectory() as root:
        assert sync_vs_async(pathlib.Path(root), payload) is None, kinds


@PROPERTY
@given(tensor_kinds.payloads())
def test_a_snapshot_pickles_to_the_bytes_of_the_original_and_later_changes_never_reach_it(case):
    payload, kinds = case
    if "nested (jagged, refused)" in kinds:
        return  # a tensor subclass: refused by prepare_payload before any snapshot (see above)
    before = io.BytesIO()
    torch.save(payload, before)
    snapshot = StagingBuffers().snapshot(payload)
    for _, storage in _data_storages(payload):
        storage.fill_(0x5A)  # the training loop overwrites every byte of every tensor
    after = io.BytesIO()
    torch.save(snapshot, after)
    assert after.getvalue() == before.getvalue(), kinds


def _data_storages(value: object):
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return
        parts = tensor_kinds._parts(value)
        if parts:
            for _, part in parts:
                yield from _data_storages(part)
        else:
            yield id(value), value.untyped_storage()
        for attribute in vars(value).values():
            yield from _data_storages(attribute)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _data_storages(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _data_storages(item)
