#!/usr/bin/env bash
# GPU verification in one go, sized for a short lease (about 6 minutes on an H100):
# build the CUDA extension for the local GPU, run the whole test suite on it in parallel
# (CUDA and Triton paths for real), then a quick benchmark on the device.
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # quick benchmark
#   OUT=/some/dir bash benchmarks/gpu_check.sh --full     # the full suite instead (at most ~10 min)
#   WHEEL=path/to/savae_fast-*.whl OUT=... bash benchmarks/gpu_check.sh
#       installs that wheel (built elsewhere, against another torch: the stable-ABI
#       property) instead of building here, then runs the same checks
#   TESTS="tests/test_cuda_build.py ..." limits the test run to those paths (default: all)
#   TEST_SECONDS=200 BENCH_SECONDS=150 stop the tests / the benchmark after that long
#       (SIGINT: pytest still prints its summary), so a lease's time limit is never hit blind
#   PYTEST_K="cuda or graph" adds -k to the test run
#   GIT_COMMIT=abc123 names the commit where the copy has no .git
#   BENCH_ARGS="--only ops,step" replaces the benchmark's arguments (after --device/--out)
# Results, flat in $OUT: env.txt (device, versions, commit, commands), build.log, pytest.log
# (with --durations), benchmarks.log and the benchmark's results .json/.md/.png.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
bench_args=(--quick)
[ "${1:-}" = "--full" ] && bench_args=()
[ -n "${BENCH_ARGS:-}" ] && read -r -a bench_args <<< "$BENCH_ARGS"
read -r -a test_paths <<< "${TESTS:-}"
# PYTEST_K: a -k expression selecting tests within those paths

export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
[ -n "${GIT_COMMIT:-}" ] && export GIT_COMMIT  # the benchmark's results name it too
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)')}"
  echo "command: TESTS='${TESTS:-}' PYTEST_K='${PYTEST_K:-}' BENCH_ARGS='${BENCH_ARGS:-}' bash benchmarks/gpu_check.sh $*"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name()); import triton; print('triton', triton.__version__)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

t0=$(date +%s)
if [ -n "${WHEEL:-}" ]; then
  # the checkout's package must not shadow the installed wheel: run the tests from a copy without it
  "$PY" -m pip install --no-deps --force-reinstall "$WHEEL" > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  mv savae_fast savae_fast.checkout && trap 'mv savae_fast.checkout savae_fast' EXIT
  # the architectures the wheel was built for (what test_cuda_build compares against)
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import savae_fast; print(savae_fast.ops.build_info().get('cuda_archs', ''))")
  export TORCH_CUDA_ARCH_LIST
else
  "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
fi
"$PY" -c "import savae_fast as sf; print('build', sf.ops.build_info())" | tee -a "$OUT/build.log" "$OUT/env.txt"
echo "build: $(( $(date +%s) - t0 )) s"
# AFTER_BUILD="bash some/diagnostics.sh": run once the extension is built
[ -n "${AFTER_BUILD:-}" ] && bash -c "$AFTER_BUILD"

# The whole suite on the GPU machine's cores; per-test time limit against hangs.
t0=$(date +%s)
timeout -s INT -k 20 "${TEST_SECONDS:-900}" "$PY" -m pytest -q -p no:cacheprovider -n auto --timeout 300 \
  --durations 25 -rfE ${PYTEST_K:+-k "$PYTEST_K"} "${test_paths[@]}" > "$OUT/pytest.log" 2>&1
status=$?
tail -40 "$OUT/pytest.log"
echo "tests: $(( $(date +%s) - t0 )) s, exit $status" | tee -a "$OUT/env.txt"

t0=$(date +%s)
PYTHONUNBUFFERED=1 timeout -s INT -k 20 "${BENCH_SECONDS:-900}" "$PY" -m benchmarks --device cuda --out "$OUT" \
  "${bench_args[@]}" > "$OUT/benchmarks.log" 2>&1
bench_status=$?
tail -60 "$OUT/benchmarks.log"
echo "benchmarks: $(( $(date +%s) - t0 )) s, exit $bench_status" | tee -a "$OUT/env.txt"
[ "$status" -eq 0 ] && exit "$bench_status"
exit "$status"
