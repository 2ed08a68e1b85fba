"""Run tests/test_ops.py against a savae_fast._C built by CMake (ctest entry).

Stages a copy of the Python package with the CMake-built extension in it, and
runs the op tests with only that copy importable.
usage: run_op_tests.py <path of the built _C> <source dir> <staging dir>
"""

import os
import shutil
import subprocess
import sys

built, source, staging = sys.argv[1:4]
package = os.path.join(staging, "savae_fast")
shutil.rmtree(package, ignore_errors=True)
shutil.copytree(os.path.join(source, "savae_fast"), package,
                ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
shutil.copy2(built, package)
env = dict(os.environ, PYTHONPATH=staging)
cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", source,
       os.path.join(source, "tests", "test_ops.py")]
check = subprocess.run([sys.executable, "-c", "import savae_fast.ops as o; print(o.__file__, o.build_info())"],
                       env=env, cwd=staging, capture_output=True, text=True)
print(check.stdout.strip() or check.stderr)
if not check.stdout.startswith(package):
    sys.exit("the staged package was not the one imported")
sys.exit(subprocess.call(cmd, env=env, cwd=staging))
