"""The ``infnets`` command line.

Subcommands:

* ``infnets demo``: the guided tour (figures and a results table);
* ``infnets kernel``: a kernel matrix of stored inputs, tiled, resumable.

Each subcommand lives in its own private module and registers its arguments
through ``add_parser(subparsers)`` and runs through ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

#: subcommand name -> private module implementing ``add_parser`` and ``run``
SUBCOMMANDS = {
    "demo": "infnets._src.app.cli_demo",
    "kernel": "infnets._src.app.cli_kernel",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    from infnets import __version__

    parser = argparse.ArgumentParser(
        prog="infnets", description="Infinite-width neural networks: NNGP and NTK kernels."
    )
    parser.add_argument("--version", action="version", version=f"infnets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infnets`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
