"""``ckptfn export``: a checkpoint's model weights as a safetensors file, for inference.

The checkpoint and ``--to`` may each be a local path or an object-store URL
(``s3://bucket/run/best_loss.pt``); a remote ``--to`` is published by the
object-store protocol, one atomic upload.
"""

from __future__ import annotations

import argparse
import os

from ckptfn.cli.errors import UserError, human_size, printable, remote_kind, store_errors
from ckptfn.core.errors import CheckpointError
from ckptfn.io.export import export_safetensors
from ckptfn.io.objectstore import is_remote, location, store_for

__all__ = ["add_export", "cmd_export"]


def add_export(commands) -> None:
    """Register the ``export`` subcommand on an argparse subparsers object."""
    export = commands.add_parser(
        "export", help="write a checkpoint's model weights as a safetensors file (for inference)",
        description="Write the model weights of a ckptfn checkpoint as a safetensors file: its 'model' entry "
        "(or Lightning's 'state_dict', or the whole payload when it holds only tensors, or --key), nested "
        "names dotted, with epoch, global step, metric and value in the header.",
    )
    export.add_argument("path", help="a ckptfn checkpoint file (or object-store URL)")
    export.add_argument("--to", required=True, metavar="OUT.safetensors",
                        help="the file (or object-store URL) to write, replaced atomically")
    export.add_argument("--key", default=None, help="the payload entry holding the weights (dotted for nested: model.ema)")
    export.set_defaults(run=cmd_export)


def _size(out) -> int:
    """The size of what was written: a local file's, or the object's in its store."""
    if is_remote(out):
        with store_errors(out):
            store, key = store_for(out)
            return store.size(key) or 0
    return out.stat().st_size


def cmd_export(args: argparse.Namespace) -> int:
    if is_remote(args.path):
        if remote_kind(args.path) != "object":
            raise UserError(f"{args.path}: is a directory, not a checkpoint object")
    elif not os.path.lexists(location(args.path)):
        raise UserError(f"{args.path}: no such file or directory")
    if is_remote(args.to):
        with store_errors(args.to):  # its protocol known and its package installed, before any work
            store_for(args.to)
    try:
        out = export_safetensors(args.path, args.to, key=args.key)
    except ImportError as error:
        raise UserError(str(error)) from None
    except (CheckpointError, OSError) as error:
        raise UserError(str(error)) from None
    print(printable(f"exported {args.path} -> {out} ({human_size(_size(out))})"))
    return 0
