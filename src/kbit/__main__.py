"""``python -m kbit``: the command line lives in :mod:`kbit.cli` (one module per subcommand)."""

from __future__ import annotations

import sys

from kbit.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
