"""The ``m2f-lite`` command line: data, train, eval, eval-files, predict, convert, bench.

Each sub-command is a small function here that parses its arguments and calls the package; the
work lives in the modules (``m2f_lite.data``, ``m2f_lite.engine``, ...). Errors a user can fix
(a missing file, an unknown override) print one line, ``m2f-lite: error: ...``, and exit 2.
"""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """An error caused by the user's input: printed as one line, without a traceback."""


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make, download, prepare or check datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("synthetic", help="write the synthetic shapes dataset (COCO panoptic/instances + semantic PNGs)")
    s.add_argument("--out", default="data/shapes", help="output folder (default: data/shapes)")
    s.add_argument("--n-train", type=int, default=500, help="training images (default: 500)")
    s.add_argument("--n-val", type=int, default=100, help="validation images (default: 100)")
    s.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.set_defaults(func=_cmd_data_synthetic)


def _cmd_data_synthetic(args: argparse.Namespace) -> None:
    from m2f_lite.data import synthetic

    synthetic.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2f-lite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"m2f-lite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m2f-lite: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
