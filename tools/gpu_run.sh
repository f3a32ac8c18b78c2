#!/usr/bin/env bash
# flaxpod's GPU benchmark (tools/bench_gpu.py) on the device machine: one H200, no network, the image's
# python3 with its own jax + CUDA plugin (not flaxpod's pinned jax 0.10.2: jaxlib and the CUDA plugin are
# far over the 64 MiB a call may carry, and the image cannot download them).
#
# 1. Here, once, from the repo root: fetch flaxpod's pinned pure-Python flax and optax as wheels into .whl/
#    (ignored through git's info/exclude), so the bench runs the Flax NNX flaxpod is tested with whatever
#    the image holds (jax and everything else come from the image):
#        bash tools/gpu_run.sh fetch-wheels
# 2. The device tool's call (the whole run fits in 9.5 minutes: combos that would start after 400 s are
#    recorded as skipped, each combo is killed after 150 s):
#        run(command="bash tools/gpu_run.sh", carry=[".whl"], timeout_s=600)
#    Extra arguments go to tools/bench_gpu.py, e.g. the combos a first call did not reach:
#        run(command="bash tools/gpu_run.sh --attention einsum --remat dots,full --no-packed-check", ...)
#    Results come back under $OUT: results.md, results.json and bench.log (everything printed).
# A CPU dry run here, without the editable install (python -S skips it), as the device will import flaxpod:
#    OUT=/tmp/dry PYTHON=".venv/bin/python -S" PYTHONPATH=$PWD/.venv/lib/python3.11/site-packages JAX_PLATFORMS=cpu \
#        bash tools/gpu_run.sh --tiny --seq 16 --batch 2 --steps 1 --warmup 1 --remat none --loss-chunk 8
#
# flaxpod's folders install as flaxpod.model/.data/.train/.sharding (setuptools package-dir mapping), so the
# repo root is not importable as `flaxpod`; a folder of symlinks (a namespace package) gives the same names
# without pip or setuptools. grain, orbax, tokenizers and torch are not on the bench's import path.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch-wheels ]; then
    exclude="$(git rev-parse --git-path info/exclude)"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl flax==0.12.8 optax==0.2.8
    exit
fi

OUT="${OUT:-/tmp/flaxpod_bench}" PYTHON="${PYTHON:-python3}"  # PYTHON: another interpreter (a CPU dry run here)
mkdir -p "$OUT"
site=/tmp/flaxpod_site shim=/tmp/flaxpod_shim
if compgen -G ".whl/*.whl" >/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_run.sh: installing the carried wheels failed" >&2; exit 1; }
fi
mkdir -p "$shim/flaxpod"
for pkg in model data train sharding; do ln -sfn "$PWD/$pkg" "$shim/flaxpod/$pkg"; done
export PYTHONPATH="$site:$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    $PYTHON -c "import jax, flax, optax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
    timeout 580 $PYTHON -m tools.bench_gpu --out "$OUT" --steps 5 --warmup 2 --budget-s 400 --combo-timeout-s 150 "$@"
    echo "bench exit code $?"
} 2>&1 | tee "$OUT/bench.log"
