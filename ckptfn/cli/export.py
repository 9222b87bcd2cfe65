"""``ckptfn export``: a checkpoint's model weights as a safetensors file, for inference."""

from __future__ import annotations

import argparse
import os

from ckptfn.cli.errors import UserError, human_size, printable
from ckptfn.core.errors import CheckpointError
from ckptfn.io.export import export_safetensors

__all__ = ["add_export", "cmd_export"]


def add_export(commands) -> None:
    """Register the ``export`` subcommand on an argparse subparsers object."""
    export = commands.add_parser(
        "export", help="write a checkpoint's model weights as a safetensors file (for inference)",
        description="Write the model weights of a ckptfn checkpoint as a safetensors file: its 'model' entry "
        "(or Lightning's 'state_dict', or the whole payload when it holds only tensors, or --key), nested "
        "names dotted, with epoch, global step, metric and value in the header.",
    )
    export.add_argument("path", help="a ckptfn checkpoint file")
    export.add_argument("--to", required=True, metavar="OUT.safetensors", help="the file to write (replaced atomically)")
    export.add_argument("--key", default=None, help="the payload entry holding the weights (dotted for nested: model.ema)")
    export.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if not os.path.lexists(args.path):
        raise UserError(f"{args.path}: no such file or directory")
    try:
        out = export_safetensors(args.path, args.to, key=args.key)
    except ImportError as error:
        raise UserError(str(error)) from None
    except (CheckpointError, OSError) as error:
        raise UserError(str(error)) from None
    print(printable(f"exported {args.path} -> {out} ({human_size(out.stat().st_size)})"))
    return 0
