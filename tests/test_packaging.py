"""How the extension is built and loaded: only stable-ABI symbols, a clear message
when it cannot load, build information read from the library itself."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import savae_fast as sf

needs_ext = pytest.mark.skipif(not sf.ops.extension_loaded(), reason="compiled extension not available")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@needs_ext
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_extension_uses_only_the_stable_c_interface_of_torch():
    """A C++ symbol of torch (c10::, at::, torch::) would tie the binary to one torch
    release; the stable ABI is a C interface (aoti_torch_*, torch_*)."""
    from savae_fast import _C

    out = subprocess.run(["nm", "-D", "-C", "--undefined-only", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split(maxsplit=1)[1] for line in out.splitlines() if line.strip().startswith("U ")]
    unstable = [n for n in names if re.match(r"(c10|at|torch|caffe2|pybind11)::", n)]
    assert not unstable, unstable[:10]
    assert any(n.startswith("aoti_torch_") or n.startswith("torch_") for n in names)


@needs_ext
@pytest.mark.skipif(shutil.which("nm") is None or not sys.platform.startswith("linux"), reason="needs binutils' nm")
def test_extension_uses_the_shared_cpp_runtime():
    """A static copy of libstdc++ inside the extension (LDFLAGS=-static-libstdc++) has its own
    iostreams and exception runtime: with GCC 13 its first error message crashed the process.
    The extension must define none of the C++ runtime's symbols and load the shared one."""
    from savae_fast import _C

    defined = subprocess.run(["nm", "-D", "--defined-only", _C.__file__], capture_output=True, text=True,
                             check=True).stdout.split()
    runtime = {"__cxa_throw", "__gxx_personality_v0", "_ZNSo9_M_insertIlEERSoT_", "_ZNSt8ios_base4InitC1Ev"}
    assert not runtime & set(defined), sorted(runtime & set(defined))
    if shutil.which("readelf"):
        dynamic = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
        assert "libstdc++.so" in dynamic, dynamic


@needs_ext
def test_build_info_reports_the_stable_abi_target():
    info = sf.ops.build_info()
    assert info["torch_target_version"] == sf.ops.extension.TORCH_TARGET
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert (major, minor) >= tuple(int(x) for x in info["torch_target_version"].split("."))
    assert isinstance(info["cuda_kernels_compiled"], bool) and isinstance(info["cpu_vector_kernels"], bool)
    assert "cuda" not in info  # (it read as "a GPU is here")


@needs_ext
def test_cpu_vector_switch_round_trips():
    before = sf.ops.cpu_vector_kernels()
    try:
        sf.ops.set_cpu_vector_kernels(False)
        assert sf.ops.cpu_vector_kernels() is False
        if sf.ops.build_info()["cpu_vector_kernels"]:
            sf.ops.set_cpu_vector_kernels(True)
            assert sf.ops.cpu_vector_kernels() is True
        else:
            with pytest.raises(RuntimeError, match="AVX2"):
                sf.ops.set_cpu_vector_kernels(True)
    finally:
        sf.ops.set_cpu_vector_kernels(before)


def _import_with_failing_extension(error: str) -> subprocess.CompletedProcess:
    """Imports savae_fast in a fresh interpreter where importing savae_fast._C raises `error`,
    then refines once (the pure-PyTorch operators must take over)."""
    program = textwrap.dedent(f"""
        import sys, warnings, importlib.abc
        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "savae_fast._C":
                    raise {error}
        sys.meta_path.insert(0, Broken())
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import torch, savae_fast as sf
            mu, lv = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
            out = sf.refine(mu, lv, lambda z: (z ** 2).sum(-1), steps=2)
        assert not sf.ops.extension_loaded()
        for w in caught:
            print("WARNING:", w.category.__name__, w.message)
    """)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_extension_that_fails_to_load_is_reported_once_with_reason_and_fix():
    run = _import_with_failing_extension('ImportError("undefined symbol: aoti_torch_made_up")')
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stdout.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1, warnings
    assert "failed to load" in warnings[0] and "undefined symbol: aoti_torch_made_up" in warnings[0]
    assert "torch >= 2.11" in warnings[0] and "pip install --force-reinstall" in warnings[0]


def test_extension_not_built_warns_only_when_the_fallback_is_used():
    run = _import_with_failing_extension('ModuleNotFoundError("No module named savae_fast._C", name="savae_fast._C")')
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stdout.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "pure-PyTorch operators" in warnings[0], warnings


def test_source_distribution_manifest_covers_the_build_inputs():
    """Every C/C++/CUDA source and header under csrc/ matches MANIFEST.in (the sdist
    build of CI checks the result; this names the missing file)."""
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        manifest = f.read()
    assert re.search(r"recursive-include csrc .*\*\.h", manifest) and "*.cu" in manifest and "*.cpp" in manifest
    for name in ("README.md", "LICENSE", "CMakeLists.txt"):
        assert name in manifest and os.path.exists(os.path.join(ROOT, name)), name


def test_version_agrees_with_pyproject_and_changelog():
    import re

    import savae_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        project = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
    with open(os.path.join(root, "CHANGELOG.md")) as f:
        released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", f.read(), re.M)
    assert savae_fast.__version__ == project == released[0], (savae_fast.__version__, project, released)
