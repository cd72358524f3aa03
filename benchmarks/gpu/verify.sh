#!/usr/bin/env bash
# The GPU kit: every GPU test and the GPU compile benchmark in one call, results under benchmarks/results/gpu/.
#
#   bash benchmarks/gpu/verify.sh            # on a machine with an NVIDIA GPU, dery installed (or WHEELS set)
#   WHEELS=dir bash benchmarks/gpu/verify.sh # install dery's dependencies offline from a folder of wheels first
#
# Budget: at most 8 minutes on an H200 (each step has its own timeout). Without CUDA it stops at once, exit 3,
# with the reason on one line; nothing is written.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"

reason=$("$PY" - <<'PY' 2>&1
import importlib.util
if importlib.util.find_spec("torch") is None:
    print("torch is not installed"); raise SystemExit(1)
import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)"); raise SystemExit(1)
PY
)
if [ $? -ne 0 ]; then
    echo "benchmarks/gpu/verify.sh: no GPU here: ${reason}; run it on a machine with an NVIDIA GPU" >&2
    exit 3
fi

if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e ".[dev]" || { echo "verify.sh: offline install from $WHEELS failed" >&2; exit 1; }
fi

out=benchmarks/results/gpu
mkdir -p "$out"
export DERY_CACHE_DIR="${DERY_CACHE_DIR:-$(mktemp -d)}" DERY_QUIET=1 HF_HUB_OFFLINE=1
status=0
{
    echo "# GPU kit: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$PY" -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "tensorrt: not installed (TensorRT tests skip with that reason)"
} > "$out/environment.txt" 2>&1

# 1. The whole default suite, GPU tests included (nothing is deselected by marker but slow).
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" --junitxml="$out/pytest.xml" > "$out/pytest.txt" 2>&1 || status=1
# 2. The GPU-marked tests alone, with every skip reason.
timeout 60 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" -rs > "$out/pytest-gpu.txt" 2>&1 || status=1
# 3. One real compile on the GPU target (torch CUDA graphs), timed against its own budget.
timeout 120 dery-compile --target h200 --latency-ms 5 --out "$out/compile" > "$out/compile.txt" 2>&1 || status=1
tail -n 3 "$out"/pytest.txt "$out"/pytest-gpu.txt "$out"/compile.txt
exit $status
