"""robust-fast info | demo | train <recipe> | eval <checkpoint> | transferability <checkpoints> | bench <name> [args]
(also: python -m robust_fast ...)."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import List, Optional

from robust_fast.demo import add_demo_parser, run_demo
from robust_fast.demo_crt import add_crt_demo_options, demo_usage_error, run_crt_demo
from robust_fast.demo_darht import add_darht_demo_options, darht_usage_error, run_darht_demo
from robust_fast.info import info_lines
from robust_fast.train.commands import add_eval_parser, add_train_parser, run_eval, run_train
from robust_fast.transferability import add_transferability_parser, run_transferability

# Short names of benchmarks whose module is named after the op family.
ALIASES = {"loss": "multi_teacher_loss"}


def _run_benchmark(name: str, argv: List[str]) -> int:
    # The benchmarks ship with the package (benchmarks/ installs as robust_fast.benchmarks), so
    # this works from an installed copy as from a checkout. Loaded only for this command.
    from robust_fast import benchmarks
    from robust_fast.benchmarks import harness
    available = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__)
                       if m.name.startswith("bench_"))
    stem = ALIASES.get(name, name)
    if stem not in available:
        names = available + [f"{alias} (= {target})" for alias, target in ALIASES.items()]
        print(f"robust-fast bench: unknown benchmark {name!r} (available: {', '.join(names)})", file=sys.stderr)
        return 2
    module = importlib.import_module(f"robust_fast.benchmarks.bench_{stem}")
    return harness.main(module.run, argv)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="robust-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, and which backend can run where")
    bench = commands.add_parser(
        "bench", help="run a benchmark (pgd, loss, ibp, apgd, smoothing); results go to benchmarks/results/local/ "
                      "(of the checkout, else of the current directory) unless --out DIR or --save-reference")
    bench.add_argument("name")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")
    demo = add_demo_parser(commands)
    add_crt_demo_options(demo)
    add_darht_demo_options(demo)
    add_train_parser(commands)
    add_eval_parser(commands)
    add_transferability_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    if args.command == "demo":
        problem = darht_usage_error(args) or (None if args.section == "darht" else demo_usage_error(args))
        if problem:
            parser.error(problem)
        if args.section == "darht":
            return run_darht_demo(args)
        return run_crt_demo(args) if args.section == "crt" else run_demo(args)
    if args.command == "train":
        return run_train(args)
    if args.command == "eval":
        return run_eval(args)
    if args.command == "transferability":
        return run_transferability(args)
    return _run_benchmark(args.name, args.args)


if __name__ == "__main__":
    sys.exit(main())
