"""``infnets demo``: the guided tour of infinite-width networks (figures and a table).

Example::

    infnets demo                 # about 2-3 minutes on a laptop, figures in ./infnets-demo
    infnets demo --quick --out /tmp/demo   # the sub-minute version

See :mod:`infnets._src.app.demo` for what each experiment computes.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from typing import Any

__all__ = ["add_parser", "run"]

_DESCRIPTION = """\
Show what infinitely wide neural networks are, on data that ships with scikit-learn
(no download): (1) the exact NNGP posterior and NTK ensemble of a 1-D regression
with +/- 2 sigma bands; (2) test loss versus gradient-descent steps for finite
networks of widths 64, 256, 1024 and 4096 trained in PyTorch, approaching the
closed-form infinite-width curve; (3) digits classification with the NNGP and NTK of a
fully-connected and a convolutional network beside the same networks trained at
finite width; (4) a heatmap of the NTK sorted by class. Figures (PNG) and every
printed number (results.json) are written to --out.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``infnets`` command line.

    Args:
        subparsers: the ``argparse`` sub-parsers action of ``infnets``.

    Returns:
        The ``demo`` parser.
    """
    p = subparsers.add_parser(
        "demo",
        help="guided tour: regression bands, training dynamics, digits, kernel heatmap",
        description=textwrap.dedent(_DESCRIPTION),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        default="infnets-demo",
        help="folder for the PNG figures and results.json (default: ./infnets-demo)",
    )
    p.add_argument("--quick", action="store_true", help="sub-minute version with smaller problems")
    p.add_argument("--seed", type=int, default=0, help="seed of data splits and networks")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed arguments; returns the exit status.

    Args:
        args: the namespace from :func:`add_parser`'s parser.

    Returns:
        0 on success, 2 when ``--out`` is not a writable folder.
    """
    import sys

    from infnets._src.app.demo import run_demo

    out = os.fspath(args.out)
    try:  # an unwritable --out fails here, in one clear line, not after minutes of work
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".infnets-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        print(
            f"infnets demo: error: --out {out!r} is not a writable folder "
            f"({err.strerror or err}); pass --out with a folder you can write to.",
            file=sys.stderr,
        )
        return 2
    run_demo(
        out=out,
        quick=bool(args.quick),
        seed=int(args.seed),
        progress=not args.no_progress,
    )
    return 0
