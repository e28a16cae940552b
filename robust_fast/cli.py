"""robust-fast info | demo | train <recipe> | eval <checkpoint> | bench <name> [args]
(also: python -m robust_fast ...)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


# Short names of benchmarks whose file is named after the op family.
ALIASES = {"loss": "multi_teacher_loss"}


def _benchmarks_dir() -> Path:
    # The benchmarks live in the source tree, not in the installed package: next to the package
    # in an editable install, else the checkout the command is run from.
    for folder in (BENCHMARKS_DIR, Path.cwd() / "benchmarks"):
        if (folder / "harness.py").is_file():
            return folder
    return BENCHMARKS_DIR


def _run_benchmark(name: str, argv: List[str]) -> int:
    benchmarks = _benchmarks_dir()
    script = benchmarks / f"bench_{ALIASES.get(name, name)}.py"
    if not script.is_file():
        available = sorted(p.stem[len("bench_"):] for p in benchmarks.glob("bench_*.py"))
        where = f"available: {', '.join(available)}" if available else \
            "no benchmarks/ folder next to the package or in the current directory; run it from a source checkout"
        print(f"robust-fast bench: unknown benchmark {name!r} ({where})", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"robust_fast_bench_{name}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(benchmarks))  # the scripts share benchmarks/harness.py
    try:
        spec.loader.exec_module(module)
        return int(module.main(argv) or 0)
    finally:
        sys.path.remove(str(benchmarks))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="robust-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, and which backend can run where")
    bench = commands.add_parser(
        "bench", help="run a benchmark from benchmarks/ (pgd, loss, ibp, apgd); results go to "
                      "benchmarks/results/local/ unless --out DIR or --save-reference")
    bench.add_argument("name")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")
    from robust_fast.demo import add_demo_parser
    from robust_fast.train.commands import add_eval_parser, add_train_parser
    add_demo_parser(commands)
    add_train_parser(commands)
    add_eval_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "info":
        from robust_fast.info import info_lines
        print("\n".join(info_lines()))
        return 0
    if args.command == "demo":
        from robust_fast.demo import run_demo
        return run_demo(args)
    if args.command == "train":
        from robust_fast.train.commands import run_train
        return run_train(args)
    if args.command == "eval":
        from robust_fast.train.commands import run_eval
        return run_eval(args)
    return _run_benchmark(args.name, args.args)


if __name__ == "__main__":
    sys.exit(main())
