"""Command line: `python -m sparsekit demo` (the main job), `tour`, and `info`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune a CNN trained on scikit-learn digits three ways "
                                       "(2:4, network slimming, 80%% unstructured), then "
                                       "SmolLM2-135M to 2:4 with SparseGPT")
    demo.add_argument("--out", default="demo-output", help="folder for the figure and results.json")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    demo.add_argument("--finetune", type=int, default=12, help="fine-tuning epochs per method")
    demo.add_argument("--no-llm", action="store_true",
                      help="skip the language-model part (SmolLM2-135M pruned 2:4 with SparseGPT)")
    tour = sub.add_parser("tour", help="every mask method on real layers, 2:4 compression and "
                                       "byte ratios, a 2:4 Linear timed against dense")
    tour.add_argument("--out", default="demo-output", help="folder for the figure and results")
    tour.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="how this installation was built and which kernels it runs")
    args = parser.parse_args(argv)
    if args.command == "info":
        import sparsekit

        print(json.dumps(sparsekit.build_info(), indent=2))
        return 0
    if args.command == "tour":
        from .demo import run_demo

        return run_demo(args.out, seed=args.seed)
    from .digits_demo import run

    run(args.out, seed=args.seed, epochs=args.epochs, finetune=args.finetune)  # says if a target is missed
    if not args.no_llm:
        from . import lm

        reason = lm.available()
        if reason is not None:
            print(f"\nlanguage-model part skipped: {reason}")
        else:
            from .llm_demo import run as run_llm

            run_llm(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
