"""robust-fast info | demo [rrm|crt|darht|transfer] | train <recipe> | eval <checkpoint> |
transferability <checkpoints> | bench <name> [args] (also: python -m robust_fast ...). A mistake
in what was asked for prints one line; --debug (or ROBUST_FAST_DEBUG=1) shows the traceback."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import List, Optional

from robust_fast._user_errors import USER_ERRORS, debug_requested
from robust_fast._allocator import tune_cpu_allocator
from robust_fast.demo import RRM_SECTION_OPTIONS, add_demo_parser, run_demo, usage_error
from robust_fast.demo_crt import CRT_SECTION_OPTIONS, add_crt_demo_options, run_crt_demo
from robust_fast.demo_darht import DARHT_SECTION_OPTIONS, add_darht_demo_options, run_darht_demo
from robust_fast.demo_transfer import TRANSFER_SECTION_OPTIONS, add_transfer_demo_options, run_transfer_demo
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


def demo_usage_error(args) -> Optional[str]:
    """Options given to `demo <section>` that only other sections take, as one line, or None."""
    return usage_error(args, RRM_SECTION_OPTIONS, CRT_SECTION_OPTIONS, DARHT_SECTION_OPTIONS,
                       TRANSFER_SECTION_OPTIONS)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    try:
        return _main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"robust-fast {command}: error: {error}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 1


class _Parser(argparse.ArgumentParser):
    """A mistyped option gets one line naming it and where to look, not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _main(argv: List[str]) -> int:
    parser = _Parser(prog="robust-fast", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the traceback (also ROBUST_FAST_DEBUG=1)")
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
    add_transfer_demo_options(demo)
    add_train_parser(commands)
    add_eval_parser(commands)
    add_transferability_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    if args.command in ("demo", "train", "eval"):
        tune_cpu_allocator()  # freed memory kept for the next tensor: no page faults (_allocator.py)
    if args.command == "demo":
        problem = demo_usage_error(args)
        if problem:
            parser.error(problem)
        if args.section == "darht":
            return run_darht_demo(args)
        if args.section == "transfer":
            return run_transfer_demo(args)
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
