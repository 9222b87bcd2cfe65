"""``python -m ckptfn``: the command line (see ``ckptfn --help``)."""

import sys

from ckptfn.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
