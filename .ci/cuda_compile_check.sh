#!/usr/bin/env bash
# Checks that the CUDA sources compile and that every robust_fast op then has both a CPU and a
# CUDA kernel. Needs nvcc, not a GPU: a CUDA torch imports fine without one, and no kernel runs.
#
# The venv and the build live in ${ROBUST_FAST_CACHE:-$HOME/.cache/robust_fast}, outside the
# clone, so the clone stays clean and a second run recompiles only what changed.
#
# Environment: ROBUST_FAST_CACHE, CUDA_HOME (default /usr/local/cuda-13.0),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ROBUST_FAST_CACHE:-$HOME/.cache/robust_fast}"
VENV="$CACHE/venv-cuda"
# One build dir per clone, so that clones sharing the cache do not overwrite each other.
BUILD="$CACHE/cuda-build/$(printf '%s' "$REPO" | sha1sum | cut -c1-12)"
PY="$VENV/bin/python"
TORCH_VERSION="2.14.1"  # a CUDA 13.0 build, matching nvcc 13.0

CURRENT_STEP="start"
step() { CURRENT_STEP="$*"; printf '\n==> [%4ds] %s\n' "$SECONDS" "$*"; }
trap 'echo "FAILED after ${SECONDS}s in step: $CURRENT_STEP" >&2' ERR

step "venv: $VENV"
if ! "$PY" -c "import torch, ninja, numpy, setuptools; assert torch.__version__.startswith('$TORCH_VERSION')" 2>/dev/null; then
  echo "installing torch==$TORCH_VERSION ninja numpy setuptools"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" ninja numpy setuptools
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Auto-detection would pick /usr/local (a wrapper nvcc sits in /usr/local/bin): name the toolkit.
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH"  # ninja and nvcc
"$CUDA_HOME/bin/nvcc" --version | tail -n 1

# ATen/cuda/CUDAContext.h includes cuBLAS/cuSPARSE/cuSOLVER headers, which a pip-installed
# torch ships under site-packages/nvidia/*/include rather than in the toolkit.
NVIDIA_INCLUDES="$("$PY" - <<'EOF'
import glob, os, sysconfig
root = os.path.join(sysconfig.get_paths()["purelib"], "nvidia")
print(":".join(sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))))
EOF
)"
[[ -n "$NVIDIA_INCLUDES" ]] || { echo "no nvidia/*/include in $VENV" >&2; exit 1; }
export CPATH="$NVIDIA_INCLUDES${CPATH:+:$CPATH}"
echo "CPATH=$CPATH"

step "build (archs $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) into $BUILD"
mkdir -p "$BUILD"
(cd "$REPO" && "$PY" setup.py --quiet build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib")
LIBRARY="$(ls "$BUILD"/lib/robust_fast/_C*.so)"
echo "built $LIBRARY"

step "registrations"
"$PY" - "$LIBRARY" "$REPO/csrc/robust_fast.cpp" <<'EOF'
import re
import sys

import torch

library, schema_file = sys.argv[1:]
torch.ops.load_library(library)

registered = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("robust_fast::"))
with open(schema_file) as f:
    defined = sorted("robust_fast::" + n for n in re.findall(r'm\.def\(\s*"([\w.]+)\(', f.read()))

failures = [f"defined in {schema_file} but not registered: {n}" for n in defined if n not in registered]
if not registered:
    failures.append("no robust_fast:: op is registered")
for name in registered:
    # The computed table: a kernel registered for the device, or one for every device
    # (CompositeExplicitAutograd: the IBP backwards, which only call ATen ops).
    keys = {key: torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, key) for key in ("CPU", "CUDA")}
    ok = all(keys.values())
    print(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(f"{k}={v}" for k, v in keys.items()))
    if not ok:
        failures.append(f"{name} lacks a kernel: {keys}")

for failure in failures:
    print("FAIL", failure)
print(f"{len(registered)} ops checked, {len(failures)} failures")
sys.exit(1 if failures else 0)
EOF

step "done: the CUDA sources compile and every op has CPU and CUDA kernels"
