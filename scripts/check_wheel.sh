#!/usr/bin/env bash
# Packaging check (CI): the source distribution builds one wheel in a fresh
# environment with pip's default build isolation, and that one wheel passes the
# op tests and the Triton launch tests under torch 2.14.1 and under the oldest supported
# torch (Triton 3.8 and 3.6), each installed in its own fresh virtual environment
# (nothing cached from .venv).
#   bash scripts/check_wheel.sh            (after scripts/setup.sh, which provides `build`)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=$ROOT/build/wheel-check
NEWEST=${SAVAE_FAST_TORCH:-2.14.1}
OLDEST=${SAVAE_FAST_OLDEST_TORCH:-2.11.0}  # setup.py's TORCH_TARGET, pyproject's torch>=
TEST_DEPS=(numpy "pytest>=7" "hypothesis>=6" expecttest "pytest-xdist>=3" "pytest-timeout>=2")
rm -rf "$WORK" && mkdir -p "$WORK/dist" "$WORK/run"

# 1. Source distribution (no compilation; must carry every header the build needs).
.venv/bin/python -m build --sdist --no-isolation --outdir "$WORK/dist" . >/dev/null
sdist=$(ls "$WORK"/dist/savae_fast-*.tar.gz)
echo "sdist: $(basename "$sdist") ($(tar tzf "$sdist" | grep -c '^savae_fast-[^/]*/csrc/.*\.h$') headers)"

fresh_env() {  # fresh_env <dir> <torch version>
  "$PY" -m venv "$1"
  "$1/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$2" "${TEST_DEPS[@]}"
}

op_tests() {  # op_tests <venv>: the installed wheel, not this checkout, is imported
  (cd "$WORK/run" && "$1/bin/python" - "$1" <<'PY'
import sys, torch, savae_fast as sf
venv = sys.argv[1]
info = sf.ops.build_info()
print(f"torch {torch.__version__}: savae_fast from {sf.__file__}, {info}")
assert sf.__file__.startswith(venv), "the installed wheel was not the one imported"
assert sf.ops.extension_loaded() and sf.ops.available("cpu"), sf.ops.EXTENSION_ERROR
if info.get("cuda_kernels_compiled"):  # a CUDA build registers every op for CUDA, GPU or not
    assert all(sf.ops.has_kernel(op, "cuda") for op in sf.ops.OP_NAMES)
PY
  )
  (cd "$WORK/run" && "$1/bin/python" -m pytest -q -p no:cacheprovider -n 2 --rootdir "$ROOT" \
    "$ROOT/tests/test_ops.py" "$ROOT/tests/test_cuda_build.py" "$ROOT/tests/test_triton_launch.py")
}

# 2. One wheel, built from the sdist by plain pip (isolated build environment).
fresh_env "$WORK/venv-$NEWEST" "$NEWEST"
start=$(date +%s)
"$WORK/venv-$NEWEST/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$WORK/dist" "$sdist"
wheel=$(ls "$WORK"/dist/savae_fast-*.whl)
echo "wheel: $(basename "$wheel") built in $(( $(date +%s) - start )) s"

# 3. That wheel under the newest and the oldest supported torch (and their Triton releases).
"$WORK/venv-$NEWEST/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
op_tests "$WORK/venv-$NEWEST"
rm -rf "$WORK/venv-$NEWEST"  # a CUDA build of torch is several GB: one environment at a time
fresh_env "$WORK/venv-$OLDEST" "$OLDEST"
"$WORK/venv-$OLDEST/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$wheel"
op_tests "$WORK/venv-$OLDEST"
rm -rf "$WORK/venv-$OLDEST"
echo "wheel check passed: $(basename "$wheel") under torch $NEWEST and $OLDEST"
