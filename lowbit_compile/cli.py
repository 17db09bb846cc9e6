"""The `lowbit` command."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description="low-bit quantization for PyTorch 2 models")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="quantize the real all-MiniLM-L6-v2, compile it and compare with float")
    d.add_argument("--recipes", default="w4,w3,w2", help="comma-separated recipes to compare")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(recipes=tuple(args.recipes.split(",")), out=args.out, compiler=args.compiler)
    except Exception as e:  # one line for the user; the traceback is for --debug runs
        from .errors import LowbitError

        if isinstance(e, LowbitError):
            print(f"lowbit: error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
