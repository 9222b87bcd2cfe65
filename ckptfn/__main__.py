"""``python -m ckptfn``: the command line (see ``ckptfn --help``)."""

import sys

from ckptfn._cli import main

if __name__ == "__main__":
    sys.exit(main())
