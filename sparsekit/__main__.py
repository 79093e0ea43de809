"""Command line: `python -m sparsekit demo [--out DIR]` and `python -m sparsekit info`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="masks on real layers, 2:4 compression, ratios, a picture")
    demo.add_argument("--out", default="demo-output", help="folder for the figure and results.json")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="how this installation was built and which kernels it runs")
    args = parser.parse_args(argv)
    if args.command == "info":
        import sparsekit

        print(json.dumps(sparsekit.build_info(), indent=2))
        return 0
    from .demo import run_demo

    return run_demo(args.out, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
