#!/usr/bin/env bash
# Installs everything robust_fast needs (idempotent), then runs one job:
#   bash scripts/run.sh demo  [args]   robustness transfer end to end (robust-fast demo; --quick
#                                      for the same path on a subset); results in runs/demo-<time>/
#   bash scripts/run.sh bench [args]   the PGD benchmark (robust-fast bench pgd; results in
#                                      benchmarks/results/local/, or --save-reference)
#   bash scripts/run.sh test  [args]   the test suite (pytest tests/, or the tests the args name); on a machine with an NVIDIA
#                                      GPU every (backend, device) pair runs, then the quick
#                                      CUDA benchmark (robust-fast bench pgd --device cuda --quick)
# The virtual environment lives outside the clone, in $ROBUST_FAST_VENV
# (default ~/.cache/robust_fast/venv-cpu, or venv-gpu on a machine with an NVIDIA GPU). On a GPU
# machine where python3 (or $ROBUST_FAST_PYTHON) already has a CUDA torch, venv-gpu is made with
# --system-site-packages and uses that torch: only missing packages are installed, so a machine
# that has them all needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-}"
shift || true
case "$job" in
  demo|bench|test) ;;
  *) echo "usage: bash scripts/run.sh demo|bench|test [args]" >&2; exit 2 ;;
esac

cache="${ROBUST_FAST_CACHE:-$HOME/.cache/robust_fast}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu
  torch_spec="torch"            # a CUDA build; its triton comes with it
else
  flavour=cpu
  torch_spec="torch==2.13.0"    # the CPU build
fi
venv="${ROBUST_FAST_VENV:-$cache/venv-$flavour}"

# Fashion-MNIST for the benchmarks and the training recipes (Debian's package).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing dataset-fashion-mnist"
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) ||
    echo "   (could not install dataset-fashion-mnist: benchmarks fall back to random data)"
fi

base_py="${ROBUST_FAST_PYTHON:-python3}"
system_torch=""
if [ "$flavour" = gpu ] && "$base_py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
  # A CUDA torch is already installed: the environment uses it (no download: works offline).
  system_torch=1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv${system_torch:+ (with the installed CUDA torch)}"
  "$base_py" -m venv ${system_torch:+--system-site-packages} "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.robust_fast_deps"
deps="$torch_spec numpy ninja nvtx triton scipy matplotlib tqdm pytest"
if [ -n "$system_torch" ]; then
  # Only what the environment lacks is installed: nothing, and no network, when all is there.
  missing=$("$py" -c "import importlib.util as u; print(' '.join(m for m in
    ('numpy', 'ninja', 'triton', 'scipy', 'matplotlib', 'tqdm', 'pytest') if u.find_spec(m) is None))")
  if [ -n "$missing" ]; then
    echo "== installing $missing (next to torch $("$py" -c 'import torch; print(torch.__version__)'))"
    # shellcheck disable=SC2086
    "$py" -m pip install -q $missing
  fi
  for optional in nvtx torchattacks; do
    if ! "$py" -c "import $optional" >/dev/null 2>&1; then
      "$py" -m pip install -q --no-deps "$optional" >/dev/null 2>&1 ||
        echo "   ($optional is not installed and could not be: NVTX ranges / the torchattacks tests are skipped)"
    fi
  done
elif [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$deps" ]; then
  echo "== installing $deps"
  "$py" -m pip install -q --upgrade pip >/dev/null
  # shellcheck disable=SC2086
  "$py" -m pip install -q $deps
  # torchattacks' own requirements would pull in torchvision and a CUDA torch.
  "$py" -m pip install -q --no-deps torchattacks==3.5.1 requests tqdm
  echo "$deps" > "$stamp"
fi

# The build folder outlives pip's temporary one (setup.py reads ROBUST_FAST_BUILD_DIR), so a
# changed source recompiles alone; with no source, header or torch change nothing is rebuilt.
export ROBUST_FAST_BUILD_DIR="${ROBUST_FAST_BUILD_DIR:-$cache/build/$(printf '%s' "$PWD" | sha1sum | cut -c1-12)}"
export MAX_JOBS="${MAX_JOBS:-2}"
build_stamp="$venv/.robust_fast_build"
signature="$(
  { echo "$PWD"; "$py" -c "import torch; print(torch.__version__)" 2>/dev/null
    find csrc setup.py pyproject.toml -type f -printf '%p %T@ %s\n' | sort; } | sha1sum | cut -c1-40)"
if [ -f "$build_stamp" ] && [ "$(cat "$build_stamp")" = "$signature" ] && ls robust_fast/_C*.so >/dev/null 2>&1; then
  echo "== robust_fast is built and installed (no source changed since)"
else
  echo "== building robust_fast (robust_fast._C) in $ROBUST_FAST_BUILD_DIR"
  # The editable install works through an import hook (kernels/ maps to robust_fast.kernels), and
  # setuptools says so in a warning box on every build; the warning filter reaches its backend.
  PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
    "$py" -m pip install -q --no-build-isolation --no-deps --no-index -e .
  echo "$signature" > "$build_stamp"
fi
"$py" -c "import robust_fast" >/dev/null
"$venv/bin/robust-fast" info

# pytest arguments that name tests (a file, a folder, file::test) replace the default tests/.
tests=(tests)
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then tests=(); break; fi
done

case "$job" in
  demo) exec "$venv/bin/robust-fast" demo "$@" ;;
  bench) exec "$venv/bin/robust-fast" bench pgd "$@" ;;
  test)
    if [ "$flavour" = gpu ]; then
      "$py" -m pytest "${tests[@]}" "$@"
      exec "$venv/bin/robust-fast" bench pgd --device cuda --quick
    fi
    exec "$py" -m pytest "${tests[@]}" "$@" ;;
esac
