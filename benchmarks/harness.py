"""The benchmarks' harness: it owns the run, the script says what to time.

A script (bench_<family>.py) defines its cases, its candidates and its own options, and hands
them to run_benchmarks(), which owns everything that is the same for every benchmark:

  the command line  --quick (the QUICK sizes instead of FULL), --device cpu|cuda, --out DIR |
                    --save-reference, --name, --no-compile, --threads, --parts, and the checks
                    (no --save-reference with --quick, --device cuda only with a GPU)
  the run           torch's thread count (restored afterwards), the opening notes, the header
                    line, the quiet-machine check at the start and the end, the durations
  the results       <out>/<name>.json (rows, settings, the machine stamp, notes, summary) and
                    <name>.png (the script's bar panels); the exit status (main())

Timing
  CPU:  torch.utils.benchmark.Timer.blocked_autorange (warm-up, block size chosen so timer
        overhead is negligible, torch's thread count pinned), topped up with single timed
        calls until at least `min_runs` samples exist. The MEDIAN per call is reported.
  CUDA: triton.testing.do_bench (return_mode="median"; it flushes the L2 cache between
        calls) when Triton imports, else CUDA events around each call; median.
  compare() measures several candidates in interleaved rounds, so a noisy neighbour hurts
  all of them alike and the ratios of one run stay fair.

Progress
  Each case (a compare(), or a script's case()) is a stage: a bar on a terminal (candidate,
  round, time left), one line on stderr when it ends where stderr is a log file, nothing with
  --no-progress or outside a run (a script's functions called from Python stay quiet).

Where results go
  In a source checkout (or an editable install) this file sits in benchmarks/, next to the
  committed reference figures in benchmarks/results/ (REFERENCE_DIR); a run writes
  benchmarks/results/local/ (ignored by git) unless --out DIR. Only --save-reference on a quiet
  machine writes REFERENCE_DIR. Installed from a wheel there is no reference folder: a run
  writes ./benchmarks/results/local/ under the current directory, or --out DIR.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils import benchmark as torch_benchmark

import robust_fast
from robust_fast import _build
from robust_fast._progress import Stage, command_progress

Row = Dict[str, object]

_HERE = os.path.dirname(os.path.realpath(__file__))
_COMMITTED = os.path.join(_HERE, "results")
# The committed reference figures, where this is a source checkout; None when installed.
REFERENCE_DIR: Optional[str] = _COMMITTED if os.path.isdir(_COMMITTED) else None
# Every other run (git ignores it): next to the reference, else under the current directory.
LOCAL_RESULTS_DIR = os.path.join(REFERENCE_DIR or os.path.join(os.getcwd(), "benchmarks", "results"), "local")


# --------------------------------------------------------------------------------------------
# the run

@dataclass
class Run:
    """One run of a benchmark, as the script's bench function sees it."""
    args: argparse.Namespace  # the parsed command line, the script's own options included
    config: Dict[str, object]  # a copy of QUICK or FULL: this run's sizes and repetitions
    notes: List[str] = field(default_factory=list)  # stored in the JSON, printed at the end
    durations: Dict[str, float] = field(default_factory=dict)  # seconds per stage; "total" added

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def device(self) -> str:
        return getattr(self.args, "device", "cpu")

    @property
    def compile(self) -> bool:
        """Whether the torch.compile baseline is timed (no --no-compile)."""
        return not getattr(self.args, "no_compile", True)

    @property
    def parts(self) -> Optional[List[str]]:
        return getattr(self.args, "parts", None)


def run_benchmarks(bench: Callable[[Run], List[Row]], *, name: str, description: str,
                   full: Dict[str, object], quick: Dict[str, object], title: str,
                   argv: Optional[Sequence[str]] = None, devices: bool = True,
                   compile_baseline: bool = True, parts: Optional[Sequence[str]] = None,
                   quick_help: str = "smoke run: tiny sizes (not numbers to quote)",
                   add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                   settings: Optional[Callable[[Run], Dict[str, object]]] = None,
                   summary: Optional[Callable[[List[Row]], Dict[str, object]]] = None,
                   panels: Optional[Callable[[List[Row]], List[Dict[str, object]]]] = None,
                   columns: Optional[Sequence[tuple]] = None,
                   ratio_definition: Optional[str] = None) -> Dict[str, object]:
    """Parses argv (None: sys.argv[1:]), calls bench(run) with torch's thread count set, and
    stores its rows as <name>[_cuda][_quick].json + .png; returns the stored payload plus
    "paths" and "reference_refused".

    name: the results' stem; description: the script's docstring (its first paragraph is the
    --help text); full / quick: the sizes and repetitions of a reference and of a smoke run;
    title: the plot's title, to which the device and torch version are added. devices: the
    script takes --device; compile_baseline: it times torch.compile (--no-compile skips it);
    parts: its parts, chosen by --parts; add_arguments: its own options. settings(run): what
    the JSON stores after quick/device/parts/compile (default: the config); summary(rows),
    panels(rows): the JSON's summary and the plot; columns: a table of every row printed at
    the end (format_table); ratio_definition: stored as it is.
    """
    parser = _parser(name, description.strip().split("\n\n")[0], devices=devices,
                     compile_baseline=compile_baseline, parts=parts, quick_help=quick_help)
    if add_arguments is not None:
        add_arguments(parser)
    args = _parse(parser, argv, parts)
    run = Run(args, copy.deepcopy(quick if args.quick else full), notes=_opening_notes(args))
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    global _PROGRESS
    progress_before, _PROGRESS = _PROGRESS, command_progress(not args.no_progress)
    try:  # the machine stamp, written last, records the thread count of the run
        busy = [note_if_busy("when the run started", run.notes)]
        begin = time.perf_counter()
        log(f"bench_{name} on {run.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
            f"{' (quick)' if run.quick else ''}")
        rows = bench(run)
        if compile_baseline:
            torch._dynamo.reset()  # compiled baselines hold their graphs and inputs
        if columns is not None:
            log(format_table(rows, columns))
        run.durations["total"] = time.perf_counter() - begin
        busy.append(note_if_busy("when the run ended", run.notes, own_threads=torch.get_num_threads()))
        out_dir, refused = _results_folder(args, busy, run.notes)
        for note in run.notes:
            log(f"note: {note}")
        stored = {"quick": args.quick, **{key: getattr(run, key) for key, shown in
                                          (("device", devices), ("parts", parts is not None),
                                           ("compile", compile_baseline)) if shown}}
        stored.update(settings(run) if settings is not None else run.config)
        extra: Dict[str, object] = {"durations_s": run.durations}
        if summary is not None:
            extra["summary"] = summary(rows)
        if ratio_definition is not None:
            extra["ratio_definition"] = ratio_definition
        command = " ".join(["robust-fast", "bench", name] + list(sys.argv[1:] if argv is None else argv))
        paths = write_results(_results_name(args, name), rows, settings=stored, out_dir=out_dir,
                              notes=run.notes, extra=extra, command=command,
                              panels=panels(rows) if panels is not None else (),
                              title=f"{title} ({run.device}, torch {torch.__version__})")
    finally:
        torch.set_num_threads(before)
        _PROGRESS = progress_before
    return _finish(paths, refused, run.durations["total"])


def main(run: Callable[[Optional[Sequence[str]]], Dict[str, object]],
         argv: Optional[Sequence[str]] = None) -> int:
    """A script's command line (`robust-fast bench <name>` calls it too): run(argv); the exit
    status is 1 when --save-reference was refused because the machine was busy, else 0."""
    return 1 if run(argv).get("reference_refused") else 0


# What a case's stage shows: run_benchmarks sets it for its run (command_progress), else quiet.
_PROGRESS = False


def case(label: str, total: int, unit: str = "run") -> Stage:
    """A case's stage (`with harness.case("APGD-CE", 2) as stage: ... stage.update()`): a bar on
    a terminal, one line when it ends in a log, nothing outside a run or with --no-progress."""
    return Stage(total, f"bench: {label}", unit, _PROGRESS)


def log(message: str = "") -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def optional_import(module: str) -> Tuple[Optional[object], Optional[str]]:
    """(the module, None), or (None, why not): a peer library whose rows are left empty when
    it is missing."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _parser(stem: str, description: str, *, devices: bool, compile_baseline: bool,
            parts: Optional[Sequence[str]], quick_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"robust-fast bench {stem}", description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if devices:
        parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    if parts is not None:
        parser.add_argument("--parts", default=",".join(parts),
                            help=f"comma-separated subset of {','.join(parts)}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help=f"results folder (default {os.path.relpath(LOCAL_RESULTS_DIR)}, ignored by git)")
    where.add_argument("--save-reference", action="store_true",
                       help="write the committed reference results (benchmarks/results/ of a source "
                            "checkout) that the README quotes; refused with --quick, kept local on a busy machine")
    parser.add_argument("--name", default=None, help=f"results file stem (default {stem}[_cuda][_quick])")
    if compile_baseline:
        parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress (default: a bar per case on a terminal, one line per case in a log file)")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
           parts: Optional[Sequence[str]]) -> argparse.Namespace:
    """The arguments, checked: --parts a subset of parts (the list replaces the string), no
    --save-reference with --quick or where there is no reference folder, --device cuda only
    with a GPU."""
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    if parts is not None:
        args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = set(args.parts) - set(parts)
        if unknown:
            parser.error(f"unknown parts: {sorted(unknown)}")
    if args.save_reference and args.quick:
        parser.error("--save-reference: a --quick run is a smoke test, not reference figures")
    if args.save_reference and REFERENCE_DIR is None:
        parser.error("--save-reference: the reference figures live in a source checkout's "
                     "benchmarks/results/, and this installed copy has none; use --out DIR")
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    return args


def _results_name(args, stem: str) -> str:
    """--name, or stem[_cuda][_quick]."""
    cuda = getattr(args, "device", "cpu") == "cuda"
    return args.name or stem + ("_cuda" if cuda else "") + ("_quick" if args.quick else "")


def _opening_notes(args) -> List[str]:
    notes = []
    if args.quick:
        notes.append("--quick: smoke-run sizes and repeats; not numbers to quote")
    if getattr(args, "no_compile", False):
        notes.append("torch.compile baseline skipped (--no-compile)")
    if getattr(args, "device", None) == "cpu":
        notes.append("the Triton backend is not timed on CPU: there it runs only in Triton's "
                     "interpreter, a correctness tool orders of magnitude slower than any kernel; "
                     "it is timed with --device cuda")
    return notes


def _results_folder(args, busy_notes: Sequence[Optional[str]], notes: List[str]):
    """(out_dir, refused): the reference folder only for --save-reference on a quiet machine;
    None (the local folder) otherwise."""
    if not args.save_reference:
        return args.out, False
    refused = any(busy_notes)
    if refused:
        notes.append("--save-reference refused: the machine was busy")
    return (None if refused else REFERENCE_DIR), refused


def _finish(paths: Dict[str, str], refused: bool, seconds: float) -> Dict[str, object]:
    """Says where the results went (and that --save-reference was refused, if it was); returns
    the stored payload plus "paths" and "reference_refused"."""
    print(f"results: {', '.join(paths.values())}  ({seconds:.0f} s in all)", flush=True)
    if refused:
        warn(f"--save-reference refused: the machine was busy, so {REFERENCE_DIR} was left as it "
             "was; rerun on a quiet machine")
    with open(paths["json"]) as f:
        payload = json.load(f)
    payload["paths"] = paths
    payload["reference_refused"] = refused
    return payload


# --------------------------------------------------------------------------------------------
# timing

def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


SLOW_CALL_S = 0.02  # a call this long needs no blocks: one call per sample


def _cpu_samples(fn: Callable[[], object], min_run_time: float, min_runs: int,
                 estimate: Optional[float]) -> List[float]:
    single = timeit.Timer(fn)  # gc off while timing, like torch's Timer
    if estimate is None:
        estimate = single.timeit(number=1)  # warm-up, and a first guess of the cost
    if estimate >= SLOW_CALL_S:
        # Slow (an attack, an evaluation): timer overhead is nothing next to a call, and
        # blocked_autorange's own warm-up would cost a whole extra call per measurement.
        samples: List[float] = []
        while sum(samples) < min_run_time or len(samples) < min_runs:
            samples.append(single.timeit(number=1))
        return samples
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    samples = list(measurement.times)  # seconds per call, one per block
    number = measurement.number_per_run
    while len(samples) < min_runs:  # top up to min_runs blocks of the same size
        samples.append(single.timeit(number=number) / number)
    return samples


def last_level_cache_bytes() -> Optional[int]:
    """The size of the CPU's largest cache (Linux sysfs), or None when it cannot be read."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = [e for e in os.listdir(root) if e.startswith("index")]
        for entry in entries:
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        return None
    return max(sizes) if sizes else None


_flush_buffer: Optional[torch.Tensor] = None


def _flush_cpu_caches() -> None:
    """Writes a buffer of four times the last-level cache (64 MB if unknown): afterwards no
    earlier call's data is left in the CPU's caches."""
    global _flush_buffer
    if _flush_buffer is None:
        size = 4 * (last_level_cache_bytes() or 16 << 20)
        _flush_buffer = torch.empty(size // 4, dtype=torch.float32)
    _flush_buffer.fill_(1.0)


def _cold_cpu_samples(fn: Callable[[], object], min_run_time: float, min_runs: int) -> List[float]:
    """One call per sample, each after the caches were flushed (untimed): a memory-bound call
    then reads its inputs from memory, as a call does whose data another call evicted. Timed
    back to back instead, a working set near the size of the last-level cache is partly served
    from it, and a copy then looks faster than memory allows."""
    samples: List[float] = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        while sum(samples) < min_run_time or len(samples) < min_runs:
            _flush_cpu_caches()
            start = timeit.default_timer()
            fn()
            samples.append(timeit.default_timer() - start)
    finally:
        if enabled:
            gc.enable()
    return samples


def _cuda_samples(fn: Callable[[], object], min_run_time: float, min_runs: int) -> List[float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    try:
        from triton.testing import do_bench
    except Exception:  # no Triton: CUDA events around each call
        do_bench = None
    if do_bench is not None:
        rep_ms = max(min_run_time * 1e3, 1.5 * min_runs * estimate_ms)
        samples_ms = do_bench(fn, warmup=max(25, 2 * estimate_ms), rep=rep_ms, return_mode="all")
        return [t / 1e3 for t in samples_ms]
    samples, total = [], 0.0
    while total < min_run_time or len(samples) < min_runs:
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
        total += samples[-1]
    return samples


def time_samples(fn: Callable[[], object], *, device: str = "cpu", min_run_time: float = 0.5,
                 min_runs: int = 5, estimate: Optional[float] = None, cold_cache: bool = False) -> List[float]:
    """Seconds per call of fn(), one sample per timed block (CPU) or call (CUDA): at least
    min_runs samples and min_run_time seconds. estimate: the seconds of one call when already
    known (fn then counts as warm), else one untimed warm-up call measures it. cold_cache (CPU):
    one call per sample, the caches flushed before each (on CUDA Triton's do_bench flushes the
    L2 cache before every call anyway)."""
    if device.startswith("cuda"):
        return _cuda_samples(fn, min_run_time, min_runs)
    if cold_cache:
        return _cold_cpu_samples(fn, min_run_time, min_runs)
    return _cpu_samples(fn, min_run_time, min_runs, estimate)


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """median_ms (the number reported), iqr_ms, min_ms and the sample count."""
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median_ms": statistics.median(ordered) * 1e3, "iqr_ms": (q3 - q1) * 1e3,
            "min_ms": ordered[0] * 1e3, "samples": len(ordered)}


def compare(candidates: Dict[str, Callable[[], object]], *, device: str = "cpu", rounds: int = 3,
            min_run_time: float = 0.5, min_runs: int = 5, warmup_time: float = 0.1,
            warmup_runs: int = 3, cold_cache: bool = False, label: Optional[str] = None) -> Dict[str, Dict[str, object]]:
    """Times every candidate in `rounds` interleaved passes (each pass gets min_run_time/rounds
    and min_runs/rounds of each); the samples of all passes are pooled per candidate.
    cold_cache: see time_samples.

    Each candidate is first warmed up, untimed: called at least warmup_runs times and for at
    least warmup_time seconds (lazy initialisation, allocator caches, thread pools). What its
    first call returned is kept under "result", so a candidate that computes something (an
    accuracy) need not run again. label: the case's name on its progress stage (default: the
    candidates').
    """
    rounds = max(1, int(rounds))
    if label is None:
        names = ", ".join(candidates)
        label = names if len(names) <= 60 else names[:57] + "..."
    with case(label, len(candidates) * (rounds + 1), "pass") as stage:
        summary = _compare(candidates, stage, device, rounds, min_run_time, min_runs, warmup_time, warmup_runs,
                           cold_cache)
        stage.close(candidates=len(candidates), rounds=rounds)
        return summary


def _compare(candidates, stage: Stage, device, rounds, min_run_time, min_runs, warmup_time, warmup_runs,
             cold_cache) -> Dict[str, Dict[str, object]]:
    """compare's work; each warm-up and each timed pass of a candidate advances the stage."""
    results, estimates = {}, {}
    for name, fn in candidates.items():
        stage.set_postfix(candidate=name, round="warm-up")
        calls, spent, fastest = 0, 0.0, math.inf
        while calls < max(1, warmup_runs) or spent < warmup_time:
            _synchronize(device)
            start = timeit.default_timer()
            value = fn()
            _synchronize(device)
            elapsed = timeit.default_timer() - start
            if calls == 0:
                results[name] = value
            calls, spent, fastest = calls + 1, spent + elapsed, min(fastest, elapsed)
        estimates[name] = fastest
        stage.update(1)
    pooled: Dict[str, List[float]] = {name: [] for name in candidates}
    for r in range(rounds):
        for name, fn in candidates.items():
            stage.set_postfix(candidate=name, round=f"{r + 1}/{rounds}")
            pooled[name] += time_samples(fn, device=device, min_run_time=min_run_time / rounds,
                                         min_runs=max(1, math.ceil(min_runs / rounds)),
                                         estimate=estimates[name], cold_cache=cold_cache)
            stage.update(1)
    summary: Dict[str, Dict[str, object]] = {}
    for name, samples in pooled.items():
        summary[name] = dict(summarize(samples), result=results[name])
    return summary


def ratio(baseline_ms: Optional[float], this_ms: Optional[float]) -> Optional[float]:
    """Speed-up: baseline time / this time (> 1 means this is faster); None when unknown."""
    if baseline_ms is None or this_ms is None or this_ms <= 0:
        return None
    return baseline_ms / this_ms


# --------------------------------------------------------------------------------------------
# the machine stamp

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _memory_gib() -> Optional[float]:
    try:
        return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: a run on a busy machine can be told apart."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_warning(when: str, own_threads: int = 0) -> Optional[str]:
    """A warning when more work wants the cores than there are: the 1-minute load average,
    less `own_threads` (this run's own share, once it has been running), above the core count."""
    load = _load_average()
    cores = usable_cores()
    if load is None or load[0] - own_threads <= cores:
        return None
    others = f" ({load[0]} with this run's {own_threads} threads)" if own_threads else ""
    return (f"machine busy {when}: 1-minute load average {round(load[0] - own_threads, 2)}{others} "
            f"above its {cores} cores; other processes compete for the cores, so these timings are "
            "not to be trusted (above all multi-threaded eager ops, whose spinning OpenMP workers "
            "wait for scheduler ticks)")



def note_if_busy(when: str, notes: List[str], own_threads: int = 0) -> Optional[str]:
    """busy_warning(when, own_threads), added to the run's notes and printed when there is one."""
    busy = busy_warning(when, own_threads=own_threads)
    if busy:
        notes.append(busy)
        warn(busy)
    return busy


def machine_info() -> Dict[str, object]:
    """What ran the benchmark (no hostname): CPU, cores, memory, GPU, versions, threads, the
    robust_fast backends usable here (or why not), and the date."""
    backends = {}
    for device in ("cpu", "cuda"):
        backends[device] = {
            "cpp": _build.cpp_unavailable_reason(device) or "usable",
            "triton": _build.triton_unavailable_reason(device) or "usable",
        }
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "torchattacks": _version("torchattacks"),
        "numpy": _version("numpy"),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "threading_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                     "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
                          if k in os.environ},
        "load_average": _load_average(),
        "robust_fast_backends": backends,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "robust_fast": robust_fast.__version__,
    }
    return info


# --------------------------------------------------------------------------------------------
# storage and plots

def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Size):
        return list(value)
    return value


def write_json(path: str, payload: Dict[str, object]) -> str:
    """Writes payload atomically (a temporary file, then a rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(payload), f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def bar_plot(path: str, panels: Sequence[Dict[str, object]], title: str) -> Optional[str]:
    """One PNG with a grouped bar chart per panel; returns the path, or None without matplotlib.

    panel: {"title", "ylabel", "groups": [label, ...], "series": {name: [value or None per
    group]}, "reference": y of a dashed line (1.0 for ratios) or None}.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [p for p in panels if p.get("groups")]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        groups, series = list(panel["groups"]), dict(panel["series"])
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            heights = [0.0 if v is None else v for v in values]
            bars = ax.bar(xs, heights, width=width, label=name)
            for bar, v in zip(bars, values):
                if v is not None:
                    ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        if panel.get("reference") is not None:
            ax.axhline(panel["reference"], color="gray", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(name: str, rows: List[Dict[str, object]], *, settings: Dict[str, object],
                  command: str, out_dir: Optional[str] = None, notes: Sequence[str] = (),
                  extra: Optional[Dict[str, object]] = None,
                  panels: Sequence[Dict[str, object]] = (), title: Optional[str] = None) -> Dict[str, str]:
    """<out_dir>/<name>.json (every row, the machine stamp, settings, notes) and <name>.png
    (the panels); returns their paths. out_dir defaults to the git-ignored local folder."""
    out_dir = out_dir or LOCAL_RESULTS_DIR
    payload = {"benchmark": name, "machine": machine_info(), "settings": settings,
               "command": command,
               "notes": list(notes), "rows": rows}
    if extra:
        payload.update(extra)
    paths = {"json": write_json(os.path.join(out_dir, f"{name}.json"), payload)}
    png = bar_plot(os.path.join(out_dir, f"{name}.png"), panels, title or name)
    if png is not None:
        paths["png"] = png
    return paths


def format_table(rows: Sequence[Dict[str, object]], columns: Sequence[tuple]) -> str:
    """A plain-text table: columns = [(header, key, format or None), ...]; None shows as '-'."""
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        if fmt:
            return format(value, fmt)
        if isinstance(value, (list, tuple)):
            return "x".join(str(v) for v in value)
        return str(value)
    table = [[header for header, _, _ in columns]]
    table += [[cell(row, key, fmt) for _, key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(w) if i else text.ljust(w) for i, (text, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
