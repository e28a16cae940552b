"""The benchmarks, installed as robust_fast.benchmarks: harness.py owns the run, each
bench_<family>.py says what it times. `robust-fast bench <family>` runs one."""
