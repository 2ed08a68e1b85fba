#!/usr/bin/env bash
# Create .venv and install savae_fast from this checkout, with its compiled
# kernels (C++ CPU kernels; CUDA kernels too when nvcc is found or FORCE_CUDA=1).
#   PYTHON=python3.11 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${SAVAE_FAST_TORCH:-torch==2.14.1}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" "setuptools>=77" wheel ninja cmake build
# --no-build-isolation: a development install compiles against the torch installed
# above (no second torch in an isolated build environment); the extension targets
# the stable ABI, so plain `pip install .` works as well.
# A second run rebuilds nothing when the build inputs are unchanged: their fingerprint (sources,
# build files, the build's environment, the torch installed) is kept next to the environment.
EXTRAS="test,models,bench,docs"
fingerprint=$( { cat setup.py pyproject.toml CMakeLists.txt; find csrc -type f | LC_ALL=C sort | xargs cat;
  echo "$EXTRAS ${FORCE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-} ${SAVAE_FAST_SKIP_CUDA:-} ${CXX:-} ${CXXFLAGS:-} ${LDFLAGS:-}";
  .venv/bin/python -c "import torch; print(torch.__version__)"; } | sha256sum | cut -d' ' -f1)
stamp=.venv/.savae_fast_build
if [ "$(cat "$stamp" 2>/dev/null)" = "$fingerprint" ] && .venv/bin/python -c "import savae_fast._C" 2>/dev/null; then
  echo "savae_fast: build inputs unchanged since the last install, nothing to rebuild"
else
  rm -f "$stamp"
  MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" --no-build-isolation -e ".[$EXTRAS]"
  echo "$fingerprint" > "$stamp"
fi
.venv/bin/python -c "import savae_fast as sf; print('savae_fast', sf.__version__, 'compiled kernels:', sf.ops.build_info() or 'none')"
