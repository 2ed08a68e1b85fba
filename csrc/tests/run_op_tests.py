"""Run the operator tests against a savae_fast._C built by CMake (ctest entry).

Stages a copy of the Python package with the CMake-built extension in it, and
runs the op tests with only that copy importable.

With --sanitized (an extension built with -DSAVAE_FAST_SANITIZE=ON) the ASan runtime
and the C++ library are preloaded into the (uninstrumented) interpreter, and the op
tests and the operator fuzzing run in several processes at once, each with many
threads, as on a large GPU host.
usage: run_op_tests.py <path of the built _C> <source dir> <staging dir> [--sanitized]
"""

import os
import shutil
import subprocess
import sys

built, source, staging = sys.argv[1:4]
sanitized = "--sanitized" in sys.argv[4:]
package = os.path.join(staging, "savae_fast")
shutil.rmtree(package, ignore_errors=True)
shutil.copytree(os.path.join(source, "savae_fast"), package,
                ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
shutil.copy2(built, package)
env = dict(os.environ, PYTHONPATH=staging)
tests = [os.path.join(source, "tests", "test_ops.py")]
extra = []
if sanitized:
    def runtime(name):
        return subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                              check=True).stdout.strip()

    env.update(LD_PRELOAD=f"{runtime('libasan.so')}:{runtime('libstdc++.so')}",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", OMP_NUM_THREADS="8")
    tests.append(os.path.join(source, "tests", "test_reliability.py"))
    extra = ["-n", "3"]  # pytest-xdist: concurrent processes, as where the crash was seen
cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", source, *extra, *tests]
check = subprocess.run([sys.executable, "-c", "import savae_fast.ops as o; print(o.__file__, o.build_info())"],
                       env=env, cwd=staging, capture_output=True, text=True)
print(check.stdout.strip() or check.stderr[-3000:])
if not check.stdout.startswith(package):
    sys.exit("the staged package was not the one imported")
sys.exit(subprocess.call(cmd, env=env, cwd=staging))
