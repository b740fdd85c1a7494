#!/usr/bin/env bash
# GPU check for the clustering engine: gpu-marked tests, then the GPU benchmarks at 1M and 10M
# events. Uses only what is importable on the machine (no network, nothing installed).
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; PYTHON=... to pick python)
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in /work/venv/bin/python .venv/bin/python python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
echo "== python: $PYTHON"
"$PYTHON" --version
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
echo "== import cupy"
if ! "$PYTHON" -c "import cupy; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"; then
  echo "CuPy is not importable here: skipping the GPU tests and benchmarks."
  exit 0
fi
# The package from this checkout, without installing it. Wheels carried in .whl/ (anndata,
# igraph and its pure-Python needs) go to a scratch site folder.
SITE=""
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && SITE=/tmp/site
fi
export PYTHONPATH="$PWD/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export BCELLMAP_DEVICE=gpu
"$PYTHON" -c "import bcellmap.kernels.backend as b; print(b.get_backend().reason)" || exit 1
echo "== pytest -m gpu"
"$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_backend.py tests/test_som.py \
  tests/test_kmeans.py tests/test_pca.py tests/test_knn.py tests/test_leiden.py \
  tests/test_cluster_flow.py tests/test_flowsom_parity.py 2>&1 | tail -40
echo "== benchmark: 1M events on the GPU (peers: flowsom and scikit-learn on the CPU, cuML where importable)"
"$PYTHON" benchmarks/clustering.py --device gpu --events 1000000 --train-events 1000000 \
  --repeats 1 2>&1
echo "== benchmark: 1M events on this machine's CPU (same script, for the GPU/CPU ratio)"
BCELLMAP_DEVICE=cpu "$PYTHON" benchmarks/clustering.py --device cpu --events 1000000 \
  --train-events 1000000 --skip-peers --only som 2>&1
echo "== benchmark: 10M events on the GPU (mapping; SOM trained on 1M)"
"$PYTHON" benchmarks/clustering.py --device gpu --events 10000000 --train-events 1000000 \
  --skip-peers --only som 2>&1
