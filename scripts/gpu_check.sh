#!/usr/bin/env bash
# The one-shot GPU check: on a machine with a CUDA torch already installed and no network,
#   1. builds robust_fast._C in place with its CUDA kernels (pip -e, --no-build-isolation,
#      --no-index; FORCE_CUDA=1), failing loudly when torch is a CPU build or no CUDA toolkit
#      (CUDA_HOME, nvcc) is found: never a silent CPU-only build;
#   2. runs every op's CUDA and compiled-Triton tests against the reference (the (backend,
#      device) pairs on "cuda": forward, backward, NaN, strided, channels-last, in place, the
#      TF32 and 2**31-element tests);
#   3. runs the GPU benchmarks with --quick (pgd, ibp, multi_teacher_loss, smoothing);
#   4. writes one report: $OUT/report.md (with pytest's junit XML and the benchmarks' JSON).
# Sized for under 8 minutes on one H100: each step has its own time limit, and all of them
# together at most BUDGET_S (default 470 s).
# Without a visible GPU it names each GPU part it skips, writes the report and exits 0.
#
#   bash scripts/gpu_check.sh            (PYTHON=... picks the interpreter, default python3;
#                                         OUT=... the report folder, default runs/gpu-check-<time>)
set -uo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-python3}"
out="${OUT:-runs/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
report="$out/report.md"
failed=0
deadline=$(( $(date +%s) + ${BUDGET_S:-470} ))
: > "$report"

say() { echo "$*"; echo "$*" >> "$report"; }
# step NAME LIMIT_S COMMAND...: runs it with a time limit, its output in $out/NAME.log.
step() {
  local name="$1" limit="$2"; shift 2
  local start status
  start=$(date +%s)
  local left=$(( deadline - start ))
  if [ "$left" -lt 10 ]; then
    say "- $name: NOT RUN: the check's time budget is spent"
    failed=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  status=$?
  local took=$(( $(date +%s) - start ))
  tail -n 15 "$out/$name.log"
  if [ "$status" -eq 0 ]; then
    say "- $name: passed in ${took} s"
  else
    [ "$status" -eq 124 ] && say "- $name: TIMED OUT after ${limit} s" || say "- $name: FAILED (exit $status) in ${took} s"
    failed=1
  fi
  { echo '  ```'; tail -n 25 "$out/$name.log" | sed 's/^/  /'; echo '  ```'; } >> "$report"
}

say "# robust_fast GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say ""
if ! "$py" -c "import torch" 2>/dev/null; then
  say "FAILED: $py cannot import torch: install a CUDA build of torch first (PYTHON=... names another interpreter)"
  exit 1
fi
"$py" - <<'EOF' | tee -a "$report"
import os, platform, shutil, subprocess, torch
from torch.utils import cpp_extension
print(f"- python {platform.python_version()}, torch {torch.__version__}, torch CUDA {torch.version.cuda}")
print(f"- CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}")
nvcc = shutil.which("nvcc") or (os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None)
version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc and os.path.exists(nvcc) else "not found"
print(f"- CUDA_HOME {os.environ.get('CUDA_HOME') or cpp_extension.CUDA_HOME or 'not found'}; nvcc: {version}")
EOF
say ""

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "No CUDA device is visible (torch.cuda.is_available() is False): the GPU parts are skipped:"
  say "- SKIPPED build with the CUDA kernels (FORCE_CUDA=1 pip install --no-build-isolation -e .)"
  say "- SKIPPED the CUDA and compiled-Triton tests of every op (pgd_step, apgd_step, multi_teacher_loss, ibp_*, gaussian_copies, the losses)"
  say "- SKIPPED the GPU benchmarks (robust-fast bench pgd|ibp|multi_teacher_loss|smoothing --device cuda --quick)"
  say "Run this script on a machine with an NVIDIA GPU and a CUDA torch. Report: $report"
  exit 0
fi

# 1. The build: CUDA kernels or a loud failure.
cuda_home=$("$py" -c "from torch.utils import cpp_extension as c; print(c.CUDA_HOME or '')")
if [ -z "$("$py" -c "import torch; print(torch.version.cuda or '')")" ]; then
  say "FAILED: torch $("$py" -c 'import torch; print(torch.__version__)') is a CPU build: the CUDA kernels cannot be built against it"
  exit 1
fi
if [ -z "${CUDA_HOME:-}" ] && [ -z "$cuda_home" ]; then
  say "FAILED: CUDA_HOME is not set and no CUDA toolkit (nvcc) was found: the CUDA kernels cannot be built."
  say "Install the CUDA toolkit matching torch's CUDA $("$py" -c 'import torch; print(torch.version.cuda)') and set CUDA_HOME; no CPU-only build is made."
  exit 1
fi
export CUDA_HOME="${CUDA_HOME:-$cuda_home}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
step build 200 env FORCE_CUDA=1 PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
  "$py" -m pip install --no-build-isolation --no-deps --no-index -e .
step cuda_kernels_registered 30 "$py" -c "
from robust_fast import _build
reason = _build.cpp_unavailable_reason('cuda')
assert reason is None, 'the CUDA kernels are not in robust_fast._C: ' + str(reason)
print('robust_fast._C has its CUDA kernels')"
if [ "$failed" -ne 0 ]; then
  say "The build failed: no tests were run. Report: $report"
  exit 1
fi

# 2. Every op's CUDA and compiled-Triton tests (the interpreter is off where a GPU is visible).
step tests_cuda 200 "$py" -m pytest -q -ra -p no:cacheprovider --junitxml="$out/tests_cuda.xml" \
  tests/test_pgd_step.py tests/test_pgd_launch.py tests/test_apgd_step.py tests/test_ibp.py \
  tests/test_multi_teacher_loss.py tests/test_losses.py tests/test_noise.py \
  -k "cuda or tf32 or two_to_the_31"

# 3. The GPU benchmarks, quick sizes.
for name in pgd ibp multi_teacher_loss smoothing; do
  step "bench_$name" 45 "$py" -m robust_fast bench "$name" --device cuda --quick --out "$out"
done

say ""
[ "$failed" -eq 0 ] && say "All GPU checks passed. Report: $report" || say "Some GPU checks FAILED. Report: $report"
exit "$failed"
