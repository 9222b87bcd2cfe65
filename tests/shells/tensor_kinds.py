"""Payloads of many tensor kinds (hypothesis strategies), and an exact comparison of loaded payloads.

Used by tests/shells/test_payload_kinds.py and tests/reliability/corners.py: a
synchronous and an asynchronous save of the same payload must load the same,
down to the bits of every storage, the layout (strides, offsets, conj/neg bits,
coalescing, nested strides), the Python attributes and which tensors share a
storage.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import torch
from hypothesis import strategies as st

import ckptfn
from ckptfn import CheckpointManager, PayloadError


#: Element types of dense tensors; the float8 and unsigned ones only have storage-level support.
DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64, torch.complex32,
]
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _bits(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``numel`` elements of ``dtype`` with random bits (NaNs, infinities and subnormals included)."""
    generator = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=generator)
    if dtype is torch.bool:
        return (raw % 2).view(torch.bool)
    return raw.view(dtype)


shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
seeds = st.integers(0, 2**16)


@st.composite
def dense(draw, dtypes=DTYPES) -> torch.Tensor:
    shape, dtype = draw(shapes), draw(st.sampled_from(dtypes))
    numel = 1
    for size in shape:
        numel *= size
    return _bits(numel, dtype, draw(seeds)).reshape(shape)


@st.composite
def values(draw) -> torch.Tensor:
    """Finite float values (for kinds whose constructors compute with them)."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple))
    generator = torch.Generator().manual_seed(draw(seeds))
    data = torch.randn(shape, generator=generator)
    return (data * (torch.rand(shape, generator=generator) < 0.5)).to(draw(st.sampled_from(FLOATS)))


@st.composite
def views(draw) -> dict:
    """Non-contiguous views, slices into a larger storage, expanded and tied tensors."""
    base = draw(dense()).reshape(-1)
    n = base.numel()
    start = draw(st.integers(0, n))
    stop = draw(st.integers(start, n))
    step = draw(st.integers(1, 3))
    sliced = base[start:stop:step]
    parts = {"base": base, "slice": sliced, "tied": base}  # "tied": the same object under two keys
    if n >= 4:
        square = base[: (n // 2) * 2].reshape(2, n // 2)
        parts["transposed"] = square.t()
        parts["strided"] = base.as_strided((2, 2), (1, 2), draw(st.integers(0, n - 4)))
    parts["expanded"] = base[:1].expand(3) if n else base
    return parts


@st.composite
def nested(draw) -> dict:
    dtype = draw(st.sampled_from(FLOATS))
    ndim = draw(st.integers(1, 2))
    items = []
    for _ in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.integers(0, 4)) for _ in range(ndim))
        items.append(torch.randn(shape, generator=torch.Generator().manual_seed(draw(seeds))).to(dtype))
    tensor = torch.nested.nested_tensor(items)
    parts = {"nested": tensor}
    if ndim == 2 and draw(st.booleans()):
        parts["nested_transposed"] = tensor.transpose(1, 2)  # a view: other strides, the same buffer
    if draw(st.booleans()):
        parts["nested_buffer"] = tensor.values()  # the buffer itself, sharing the storage
    return parts


@st.composite
def sparse(draw) -> dict:
    data = draw(values())
    layout = draw(st.sampled_from(["coo", "coo_uncoalesced", "coo_hybrid", "csr", "csc", "bsr", "bsc"]))
    if layout == "coo":
        tensor = data.to_sparse()
    elif layout == "coo_hybrid":
        tensor = data.reshape(data.shape[0], -1).to_sparse(sparse_dim=1)
    elif layout == "coo_uncoalesced":  # duplicate indices: stored as given, not summed
        count = draw(st.integers(0, 4))
        indices = torch.randint(0, 3, (2, count), generator=torch.Generator().manual_seed(draw(seeds)))
        tensor = torch.sparse_coo_tensor(indices, torch.arange(float(count)).to(data.dtype), (3, 3))
    else:
        matrix = data.reshape(data.shape[0], -1)
        if layout in ("bsr", "bsc"):
            matrix = torch.cat([matrix, matrix]).repeat(1, 2)  # even sides, for 2x2 blocks
            tensor = matrix.to_sparse_bsr((2, 2)) if layout == "bsr" else matrix.to_sparse_bsc((2, 2))
        else:
            tensor = matrix.to_sparse_csr() if layout == "csr" else matrix.to_sparse_csc()
    parts = {"sparse": tensor}
    if tensor.layout == torch.sparse_coo and draw(st.booleans()):
        parts["sparse_values"] = tensor._values()  # shares the sparse tensor's storage
    elif tensor.layout != torch.sparse_coo and draw(st.booleans()):
        parts["sparse_values"] = tensor.values()
    return parts


@st.composite
def quantized(draw) -> dict:
    data = draw(values()).float()
    if draw(st.booleans()):
        scale = draw(st.floats(0.01, 1.0))
        tensor = torch.quantize_per_tensor(data, scale, draw(st.integers(0, 10)), draw(st.sampled_from([torch.quint8, torch.qint8, torch.qint32])))
    else:
        channels = data.shape[0]
        tensor = torch.quantize_per_channel(
            data, torch.rand(channels, dtype=torch.float64) + 0.01, torch.zeros(channels, dtype=torch.int64), 0, torch.qint8
        )
    parts = {"quantized": tensor}
    if tensor.shape[0] > 1 and draw(st.booleans()):
        parts["quantized_view"] = tensor[1:]
    return parts


@st.composite
def autograd(draw) -> dict:
    data = draw(dense([torch.float32, torch.float64, torch.complex64]))
    leaf = data.clone().requires_grad_(True)
    parts = {
        "parameter": torch.nn.Parameter(data.clone(), requires_grad=draw(st.booleans())),
        "leaf": leaf,
        "non_leaf": leaf * 2,
    }
    if draw(st.booleans()):
        parts["parameter_data"] = parts["parameter"].data  # shares the parameter's storage
    if draw(st.booleans()):
        parts["sparse_parameter"] = torch.nn.Parameter(draw(values()).to_sparse(), requires_grad=False)
    return parts


@st.composite
def lazy_views(draw) -> dict:
    """Conjugate and negative views (lazy bits in the tensor, not in its bytes), beside their base."""
    base = draw(dense([torch.complex64, torch.complex128]))
    parts = {"complex": base, "conj": base.conj()}
    if draw(st.booleans()):  # a negative view of the imaginary parts (of another tensor: torch.save
        # refuses one storage viewed as two dtypes)
        parts["neg"] = draw(dense([torch.complex64])).conj().imag
    return parts


@st.composite
def with_attributes(draw) -> dict:
    """Tensors carrying Python attributes (plain data, or another tensor of the payload)."""
    other = draw(dense())
    tensor = draw(dense()).clone()
    tensor.note = draw(st.text(max_size=5))
    tensor.count = draw(st.integers())
    parts = {"other": other, "tagged": tensor}
    if draw(st.booleans()):
        tensor.partner = other
    if draw(st.booleans()):
        non_leaf = torch.ones(2, requires_grad=True) * 3
        non_leaf.note = "grad"
        parts["tagged_non_leaf"] = non_leaf
    if draw(st.booleans()):
        parameter = torch.nn.Parameter(torch.zeros(2))
        parameter.tag = [1, 2]
        parts["tagged_parameter"] = parameter
    return parts


@st.composite
def meta(draw) -> dict:
    return {"meta": torch.empty(draw(shapes), dtype=draw(st.sampled_from(FLOATS)), device="meta")}


@st.composite
def refused(draw) -> dict:
    """A tensor subclass: refused (``PayloadError``) by both modes."""
    items = [torch.ones(draw(st.integers(1, 3))), torch.ones(2)]
    return {"jagged": torch.nested.nested_tensor(items, layout=torch.jagged)}


KINDS = {
    "dense": dense().map(lambda tensor: {"dense": tensor}),
    "views and tied weights": views(),
    "nested (strided)": nested(),
    "sparse (COO, CSR, CSC, BSR, BSC)": sparse(),
    "quantized": quantized(),
    "parameters and requires_grad": autograd(),
    "conj and neg views": lazy_views(),
    "python attributes": with_attributes(),
    "meta": meta(),
    "nested (jagged, refused)": refused(),
}


@st.composite
def payloads(draw) -> tuple[dict, list[str]]:
    """``(payload, kinds)``: a state-dict-like payload mixing a few tensor kinds."""
    names = draw(st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=3, unique=True))
    model = {}
    for name in names:
        for key, tensor in draw(KINDS[name]).items():
            model[f"{name.split()[0]}.{key}"] = tensor
    return {"model": model, "epoch": draw(st.integers(0, 9)), "names": names}, names


# --- exact comparison --------------------------------------------------------------------------


def _parts(tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The dense tensors that hold ``tensor``'s data, by role."""
    if tensor.layout == torch.sparse_coo:
        return [("indices", tensor._indices()), ("values", tensor._values())]
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [("crow", tensor.crow_indices()), ("col", tensor.col_indices()), ("values", tensor.values())]
    if tensor.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [("ccol", tensor.ccol_indices()), ("row", tensor.row_indices()), ("values", tensor.values())]
    if tensor.is_nested:
        return [
            ("buffer", tensor.values()),
            ("sizes", tensor._nested_tensor_size()),
            ("strides", tensor._nested_tensor_strides()),
            ("offsets", tensor._nested_tensor_storage_offsets()),
        ]
    return []


def tensor_difference(a: torch.Tensor, b: torch.Tensor, path: str) -> str | None:
    """How ``b`` differs from ``a`` (None: the same type, layout, flags, attributes and bits)."""
    for what, get in [
        ("type", type), ("dtype", lambda t: t.dtype), ("layout", lambda t: t.layout),
        ("device", lambda t: t.device), ("nested", lambda t: t.is_nested), ("quantized", lambda t: t.is_quantized),
        ("requires_grad", lambda t: t.requires_grad), ("conj", lambda t: t.is_conj()), ("neg", lambda t: t.is_neg()),
    ]:
        if get(a) != get(b):
            return f"{path}: {what} {get(a)} vs {get(b)}"
    if set(vars(a)) != set(vars(b)):
        return f"{path}: attributes {sorted(vars(a))} vs {sorted(vars(b))}"
    for name in vars(a):
        found = difference(vars(a)[name], vars(b)[name], f"{path}.{name}")
        if found:
            return found
    parts = _parts(a)
    if parts:
        if a.layout == torch.sparse_coo and a.is_coalesced() != b.is_coalesced():
            return f"{path}: coalesced {a.is_coalesced()} vs {b.is_coalesced()}"
        if not a.is_nested and a.shape != b.shape:
            return f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        for (role, x), (_, y) in zip(parts, _parts(b)):
            found = tensor_difference(x.detach(), y.detach(), f"{path}.{role}")
            if found:
                return found
        return None
    if (a.shape, a.stride(), a.storage_offset()) != (b.shape, b.stride(), b.storage_offset()):
        return f"{path}: shape/strides/offset {(tuple(a.shape), a.stride(), a.storage_offset())} vs {(tuple(b.shape), b.stride(), b.storage_offset())}"
    if a.is_quantized:
        if a.qscheme() != b.qscheme():
            return f"{path}: qscheme {a.qscheme()} vs {b.qscheme()}"
        if a.qscheme() == torch.per_tensor_affine:
            if (a.q_scale(), a.q_zero_point()) != (b.q_scale(), b.q_zero_point()):
                return f"{path}: quantization parameters differ"
        elif not (
            torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
            and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
            and a.q_per_channel_axis() == b.q_per_channel_axis()
        ):
            return f"{path}: per-channel quantization parameters differ"
    if a.device.type == "meta":
        return None
    if bytes(a.untyped_storage()) != bytes(b.untyped_storage()):
        return f"{path}: storage bytes differ"
    return None


def _storages(value: object, path: str, out: list) -> None:
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return
        parts = _parts(value)
        if parts:
            for role, part in parts:
                if role not in ("sizes", "strides", "offsets"):  # made afresh on each call
                    _storages(part, f"{path}.{role}", out)
        else:
            out.append((path, value.untyped_storage().data_ptr(), value.untyped_storage().nbytes()))
        for name, attribute in vars(value).items():
            _storages(attribute, f"{path}.{name}", out)
    elif isinstance(value, dict):
        for key, item in value.items():
            _storages(item, f"{path}[{key!r}]", out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _storages(item, f"{path}[{index}]", out)


def sharing(value: object) -> list[tuple[str, int]]:
    """Which tensors share a storage: each data-holding tensor's path and the index of the first
    path with its storage (empty storages are never shared: each is its own)."""
    found: list = []
    _storages(value, "", found)
    first: dict[int, int] = {}
    return [
        (path, first.setdefault(pointer, index) if size else index)
        for index, (path, pointer, size) in enumerate(found)
    ]


def difference(a: object, b: object, path: str = "payload") -> str | None:
    """How loaded payload ``b`` differs from ``a`` (None: exactly the same, sharing included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        return tensor_difference(a, b, path)
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} vs {list(b)}"
        for key in a:
            found = difference(a[key], b[key], f"{path}[{key!r}]")
            if found:
                return found
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for index, (x, y) in enumerate(zip(a, b)):
            found = difference(x, y, f"{path}[{index}]")
            if found:
                return found
    elif a != b:
        return f"{path}: {a!r} vs {b!r}"
    if path == "payload" and sharing(a) != sharing(b):
        return f"storage sharing differs: {sharing(a)} vs {sharing(b)}"
    return None


# --- saving one payload both ways -----------------------------------------------------------


def everything_in(directory: pathlib.Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def save(directory: pathlib.Path, payload: object, *, async_save: bool) -> tuple[str, object]:
    """One best save of ``payload``: ``("saved", loaded payload)``; ``("refused", PayloadError)`` with
    nothing written and nothing committed; else ``("failed", what went wrong)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = None
        try:
            with CheckpointManager(directory, ckptfn.Strategy("val_loss"), async_save=async_save) as manager:
                manager.update({"val_loss": 0.5}, payload, 0)
        except PayloadError as error:
            if everything_in(directory):
                return "failed", f"PayloadError after writing {everything_in(directory)}: {error}"
            if manager is not None and manager.best_values != {"best_val_loss.pt": None}:
                return "failed", f"PayloadError, but the best was committed: {manager.best_values}"
            return "refused", error
        except Exception as error:  # noqa: BLE001 - reported by the caller with both outcomes
            return "failed", f"{type(error).__name__}: {error}"
        return "saved", ckptfn.load_checkpoint(directory / "best_val_loss.pt")[0]


def sync_vs_async(root: pathlib.Path, payload: object) -> str | None:
    """None when both modes save ``payload`` the same (or both refuse it alike); else what differs
    ("the files differ: ..." when both saved)."""
    sync = save(root / "sync", payload, async_save=False)
    background = save(root / "async", payload, async_save=True)
    if sync[0] == background[0] == "saved":
        found = difference(sync[1], background[1])
        return None if found is None else f"the files differ: {found}"
    if sync[0] == background[0] == "refused":
        return None if str(sync[1]) == str(background[1]) else f"refused differently: {sync[1]} / {background[1]}"
    shown = [f"{mode} {outcome}" + ("" if outcome == "saved" else f" ({detail})") for mode, (outcome, detail) in
             (("sync", sync), ("async", background))]
    return ", ".join(shown)


# --- the reported case, and the other kinds the snapshot used to break ---------------------------


def nested_strided():
    return torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)], layout=torch.strided)


def conj_beside_its_base():
    base = torch.randn(3, dtype=torch.complex64)
    return {"base": base, "conj": base.conj()}  # torch.save keeps the conj bit and one shared storage


def sparse_beside_its_values():
    tensor = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse()
    return {"sparse": tensor, "values": tensor._values()}


def tagged_non_leaf():
    tensor = torch.ones(2, requires_grad=True) * 2
    tensor.note = "scaled"
    return tensor


REGRESSIONS = {
    "nested strided tensor": nested_strided,
    "transposed nested tensor": lambda: torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)]).transpose(1, 2),
    "sparse CSR": lambda: torch.eye(3).to_sparse_csr(),
    "sparse CSC": lambda: torch.eye(3).to_sparse_csc(),
    "sparse BSR": lambda: torch.eye(4).to_sparse_bsr((2, 2)),
    "Parameter holding a sparse tensor": lambda: torch.nn.Parameter(torch.eye(2).to_sparse(), requires_grad=False),
    "non-leaf tensor with an attribute": tagged_non_leaf,
    "conj view beside its base": conj_beside_its_base,
    "sparse tensor beside its values": sparse_beside_its_values,
}
