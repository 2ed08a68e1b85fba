#!/usr/bin/env bash
# GPU verification in one go: build the CUDA extension, run the test suite on the
# GPU (CUDA and Triton backends), then the benchmark suite on the device, and keep
# the logs and result files. Usage (on a machine with a CUDA GPU and torch installed):
#   OUT=/some/dir bash benchmarks/gpu_check.sh [--quick]
# Results: $OUT/build.log, $OUT/pytest.log, $OUT/nvidia-smi.txt, $OUT/benchmarks/*.{json,md,png}
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true

export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -c "import savae_fast as sf, torch; print(sf.ops.build_info(), torch.cuda.get_device_name())" | tee -a "$OUT/build.log"

# The whole suite: on a GPU machine the CUDA and Triton paths run for real (not interpreted).
python -m pytest -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -5
status=${PIPESTATUS[0]}

python -m benchmarks --device cuda --out "$OUT/benchmarks" "$@" 2>&1 | tee "$OUT/benchmarks.log" | tail -40
exit "$status"
