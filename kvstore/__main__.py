"""`python -m kvstore ...` runs the `kvstore` command (see kvstore/cli.py)."""

from __future__ import annotations

import sys

from kvstore.cli import main

if __name__ == "__main__":
    sys.exit(main())
