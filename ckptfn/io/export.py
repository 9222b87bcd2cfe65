"""Weights for inference: a ckptfn checkpoint's model as a ``safetensors`` file.

Training checkpoints carry optimizer state and pickled structure; inference wants
the weights alone, in the format the ecosystem loads fast and without pickle.
``export_safetensors`` picks the model's state dict out of a checkpoint (its
``model`` entry, Lightning's ``state_dict``, the whole payload when it is a flat
mapping of tensors, or the entry ``key`` names), flattens nested mappings to dotted
names, gives tensors that share memory their own copy (safetensors refuses
aliases; the values are the same), stores the checkpoint's position and the value
that chose it as string metadata in the header, and publishes the file with the
same protocol as every checkpoint (complete or absent, never half-written).

Either end may be an object-store URL: a remote checkpoint is loaded as
``load_checkpoint`` loads it, and a remote ``out`` is published by the object-store
protocol (``ckptfn.io.remote``: one atomic upload), never written to a local path.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

from ckptfn.core.errors import CheckpointError, PayloadError
from ckptfn.core.snapshot import Target
from ckptfn.io.fs import REAL
from ckptfn.io.objectstore import RemotePath, is_remote, location, store_for
from ckptfn.io.publish import FILE, Publisher, publish
from ckptfn.io.read import load_checkpoint

__all__ = ["export_metadata", "export_safetensors", "weights_of"]

#: The entries tried, in order, when no ``key`` is given.
MODEL_KEYS = ("model", "state_dict", "model_state_dict")


def _is_tensor(value: object) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _flatten(mapping: Mapping, prefix: str, out: dict, where: str) -> None:
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise PayloadError(f"{where}: keys must be str to name tensors, got {type(key).__name__} {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, name + ".", out, f"{where}[{key!r}]")
        elif _is_tensor(value):
            if name in out:
                raise PayloadError(f"{where}[{key!r}]: the name {name!r} is used twice once nested keys are dotted")
            out[name] = value
        else:
            raise PayloadError(
                f"{where}[{key!r}]: a {type(value).__name__} is not a tensor; pass --key to export the model's "
                "state dict (e.g. --key model)"
            )


def weights_of(payload: object, key: str | None = None, *, where: str = "payload") -> dict:
    """The model's tensors in ``payload``, under flat dotted names.

    >>> import torch
    >>> sorted(weights_of({"model": {"0": {"weight": torch.zeros(2)}}, "optimizer": {"state": {}}}))
    ['0.weight']
    >>> weights_of({"model": {"w": torch.zeros(1)}}, "optimizer")
    Traceback (most recent call last):
    ...
    ckptfn.PayloadError: payload: no entry 'optimizer' (entries: model)
    """
    if not isinstance(payload, Mapping):
        raise PayloadError(f"{where}: expected a mapping of tensors, got {type(payload).__name__}")
    chosen, path = payload, where
    if key is not None:
        for part in key.split("."):
            if not isinstance(chosen, Mapping) or part not in chosen:
                entries = ", ".join(map(str, chosen)) if isinstance(chosen, Mapping) else type(chosen).__name__
                raise PayloadError(f"{path}: no entry {part!r} (entries: {entries})")
            chosen, path = chosen[part], f"{path}[{part!r}]"
    else:
        found = next((k for k in MODEL_KEYS if isinstance(payload.get(k), Mapping)), None)
        if found is not None:
            chosen, path = payload[found], f"{where}[{found!r}]"
    if not isinstance(chosen, Mapping):
        raise PayloadError(f"{path}: expected a mapping of tensors, got {type(chosen).__name__}")
    flat: dict = {}
    _flatten(chosen, "", flat, path)
    if not flat:
        raise PayloadError(f"{path}: holds no tensors")
    return flat


def _unaliased(tensors: dict) -> dict:
    """Every tensor contiguous and owning its memory unless it is the only one using it."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        storage = tensor.untyped_storage()
        span = (storage.data_ptr(), storage.nbytes())
        shared = span in seen or tensor.numel() * tensor.element_size() != storage.nbytes()
        seen.add(span)
        out[name] = tensor.contiguous().clone() if shared else tensor.contiguous()
    return out


def export_metadata(metadata: Mapping) -> dict[str, str]:
    """The string metadata written into the safetensors header.

    >>> export_metadata({"epoch": 3, "global_step": 120, "saves": [{"metric_name": "val_loss", "value": 0.25}]})
    {'format': 'pt', 'ckptfn.epoch': '3', 'ckptfn.global_step': '120', 'ckptfn.metric': 'val_loss', 'ckptfn.value': '0.25', 'ckptfn.saves': '[{"metric_name": "val_loss", "value": 0.25}]'}
    """
    header = {"format": "pt"}
    for key in ("epoch", "global_step", "timestamp"):
        if metadata.get(key) is not None:
            header[f"ckptfn.{key}"] = str(metadata[key])
    saves = [entry for entry in metadata.get("saves") or [] if isinstance(entry, Mapping)]
    chosen = next((entry for entry in saves if "metric_name" in entry), None)
    if chosen is not None:
        header["ckptfn.metric"] = str(chosen["metric_name"])
        header["ckptfn.value"] = repr(chosen.get("value"))
    if saves:
        header["ckptfn.saves"] = json.dumps(saves, default=str)
    return header


def _publish_remote(out: RemotePath, data: bytes) -> RemotePath:
    """Publish ``data`` as the object ``out`` by the object-store protocol (one atomic upload of a
    local spool file); ``CheckpointError`` when ``out`` names no file or names a directory."""
    from ckptfn.io.remote import publish_remote

    within = out.split("://", 1)[1].strip("/")
    if out.endswith("/") or "/" not in within or out.name in ("", ".", ".."):
        raise CheckpointError(f"{out}: the export needs an object name (e.g. {out.rstrip('/')}/model.safetensors)")
    try:
        store, key = store_for(out)
        directory = store.size(key) is None and bool(store.names(key))
    except (ImportError, ValueError):  # no package for the protocol, or no such protocol: the caller's to say
        raise
    except Exception as error:  # noqa: BLE001 - the store's errors (network, permissions) as one kind
        raise CheckpointError(f"{out}: cannot be written ({type(error).__name__}: {error})") from error
    if directory:
        raise CheckpointError(f"{out}: is a directory; the export needs an object name (e.g. {out}/model.safetensors)")

    def spool(directory: pathlib.Path) -> pathlib.Path:
        path = directory / out.name
        with REAL.create(path) as file:
            file.write(data)
        return path

    (published,) = publish_remote(out.parent, [Target(out.name)], None, produce=spool)
    return published


def export_safetensors(
    path: str | os.PathLike, out: str | os.PathLike, *, key: str | None = None
) -> pathlib.Path | RemotePath:
    """Write the model weights of the checkpoint at ``path`` to the safetensors file ``out``.

    Returns ``out``'s path (a ``RemotePath`` for a URL). Raises ``CheckpointError`` for a file
    that is not a readable ckptfn checkpoint (or a failed write: ``CheckpointWriteError``),
    ``PayloadError`` when the chosen entry is not a mapping of tensors, ``ImportError``
    without the ``safetensors`` package.

    >>> import tempfile, torch, ckptfn
    >>> from safetensors.torch import load_file
    >>> model = torch.nn.Linear(3, 2)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     manager = ckptfn.CheckpointManager(directory, ckptfn.Strategy("val_loss"))
    ...     _ = manager.update({"val_loss": 0.5}, {"model": model.state_dict(), "optimizer": {}}, 4, global_step=40)
    ...     exported = export_safetensors(f"{directory}/best_val_loss.pt", f"{directory}/model.safetensors")
    ...     weights = load_file(exported)
    >>> sorted(weights), torch.equal(weights["weight"], model.weight)
    (['bias', 'weight'], True)
    """
    try:
        from safetensors.torch import save
    except ImportError as error:
        raise ImportError("ckptfn export needs safetensors: pip install 'ckptfn[safetensors]'") from error
    payload, metadata = load_checkpoint(path)
    tensors = _unaliased(weights_of(payload, key, where=str(path)))
    data = save(tensors, metadata=export_metadata(metadata))
    out = location(out)  # a URL stays a URL: never a local path made of it
    if is_remote(out):
        return _publish_remote(out, data)
    if out.name in ("", ".", "..") or out.is_dir():
        raise CheckpointError(f"{out}: the export needs a file name (e.g. model.safetensors)")

    def produce(publisher: Publisher) -> pathlib.Path:
        temp = publisher.new_temp(out.name)
        with publisher.fs.create(temp) as file:
            file.write(data)
            file.sync()
        return temp

    (published,) = publish(out.parent if str(out.parent) else pathlib.Path("."), [Target(out.name)], FILE, produce)
    return published
