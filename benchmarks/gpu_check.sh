#!/usr/bin/env bash
# One short GPU check (< 8 min on one H200): bf16 Wanda / M-Wanda / SparseGPT on CUDA against the CPU fp32
# masks, prune time vs one plain forward pass, peak GPU memory, a 1-process NCCL run of the data-parallel
# path, and on the demo model's shapes every method and memory option of docs/large-models.md (float32
# Hessian sums, offloaded statistics: peak memory and seconds per layer against optimum_mwanda.memory's
# prediction, and the pre-run memory check). Models come from benchmarks/configs/ with seeded random
# weights: nothing is downloaded. Without CUDA, --device cuda stops at once with a clear message.
#
#   bash benchmarks/gpu_check.sh                      # on a CUDA machine; writes to $OUT or benchmarks/results/gpu_check
#   bash benchmarks/gpu_check.sh --device cpu --tiny  # CPU smoke test of the same script
#
# Needs CUDA PyTorch and transformers. The pure-Python dependencies such a machine may lack are installed
# from benchmarks/.wheels (git-ignored; carry it along), filled here beforehand with
#   pip download --no-deps -d benchmarks/.wheels accelerate langcodes jinja2 dill
#   for v in 3.10 3.11 3.12 3.13; do pip download --no-deps --only-binary=:all: --python-version $v \
#       --platform manylinux2014_x86_64 -d benchmarks/.wheels markupsafe psutil; done
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
if [ -d benchmarks/.wheels ]; then
    for module in psutil markupsafe accelerate langcodes jinja2 dill; do
        if ! "$PYTHON" -c "import $module" 2>/dev/null; then
            "$PYTHON" -m pip install --quiet --no-index --find-links benchmarks/.wheels "$module" \
                || echo "gpu_check: could not install $module from benchmarks/.wheels" >&2
        fi
    done
fi
"$PYTHON" - <<'PY'
import torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}", flush=True)
PY
uptime
exec timeout 470 "$PYTHON" benchmarks/gpu_check.py "$@"
