"""Build of savae_fast._C (C++ CPU kernels, plus CUDA kernels when CUDA is available).

Environment switches:
  FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible
                          (nvcc is still required).
  SAVAE_FAST_SKIP_CUDA=1  never build the CUDA kernels.
  SAVAE_FAST_SKIP_EXT=1   build no extension at all (pure-PyTorch install).
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0+PTX" when unset).
  MAX_JOBS                parallel compile jobs (ninja).
  SAVAE_FAST_DEBUG=1      -O0 -g builds.
Metadata lives in pyproject.toml.

The extension uses only the LibTorch stable ABI, built for TORCH_TARGET (the
oldest torch it supports), and the Python limited API: the one wheel loads
under every torch >= TORCH_TARGET and every CPython >= 3.10, whichever torch
it was compiled against (pip's isolated build environment included).
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
TORCH_TARGET = (2, 11)  # keep in step with pyproject.toml's torch requirement

def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")

def _nvidia_wheel_dirs() -> tuple[list[str], list[str]]:
    """CUDA headers/libraries shipped as pip wheels (nvidia/cu13, nvidia/cu12, ...).

    A CUDA build of torch from PyPI brings the CUDA runtime headers it was
    built against; a minimal local toolkit may lack some of them.
    """
    includes, libs = [], []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        for root in sorted(glob.glob(os.path.join(base, "nvidia", "cu*"))):
            if os.path.isdir(os.path.join(root, "include")):
                includes.append(os.path.join(root, "include"))
            if os.path.isdir(os.path.join(root, "lib")):
                libs.append(os.path.join(root, "lib"))
    return includes, libs

def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit root before torch.utils.cpp_extension reads it.

    torch derives it from ``which nvcc``, which is wrong when nvcc on PATH is a
    wrapper script (e.g. /usr/local/bin/nvcc); prefer a root that has both
    bin/nvcc and include/cuda_runtime.h."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = ["/usr/local/cuda", "/opt/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            os.environ["CUDA_HOME"] = root
            return


def _shared_cxx_runtime() -> list[str]:
    """Link arguments that make the extension use the shared libstdc++ this process (and torch)
    loaded. A private static copy brings its own iostreams, whose uninitialised locale crashed
    the first error message (GCC 13), and its own exception runtime. Toolchains link one when
    LDFLAGS has -static-libstdc++ or when their own library directory holds only libstdc++.a
    (seen with a GCC 13.3 under /opt/gcc): `-lstdc++` then finds the archive, so the shared
    library is named by its path, before the compiler's implicit one. tests/test_packaging.py
    checks the result; .ci/run builds under LDFLAGS=-L<dir with only libstdc++.a> -static-libstdc++."""
    if not sys.platform.startswith("linux"):
        return []
    try:  # torch is imported: its C++ runtime is mapped into this process
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.exists(path):
                    return [path]
    except OSError:
        pass
    return ["-lstdc++"]


def _extensions():
    if _flag("SAVAE_FAST_SKIP_EXT"):
        return [], {}
    if not _flag("SAVAE_FAST_SKIP_CUDA"):
        _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("SAVAE_FAST_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]

    built_against = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if built_against < TORCH_TARGET:
        raise RuntimeError(
            f"savae_fast needs torch >= {TORCH_TARGET[0]}.{TORCH_TARGET[1]} to build (stable ABI target), "
            f"found {torch.__version__}"
        )
    target = f"0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"
    # Newer headers cannot leak newer APIs in: every stable-ABI call is checked against the target.
    abi_flags = [f"-DTORCH_TARGET_VERSION={target}"]
    cxx_flags = opt + ["-fvisibility=hidden", "-std=c++20"] + abi_flags  # C++20: lambdas capture structured bindings

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + sorted(
        glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
    )
    have_nvcc = CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    use_cuda = (
        bool(cuda_sources)
        and not _flag("SAVAE_FAST_SKIP_CUDA")
        and torch.version.cuda is not None
        and (_flag("FORCE_CUDA") or have_nvcc)
    )
    if _flag("FORCE_CUDA") and not use_cuda and not _flag("SAVAE_FAST_SKIP_CUDA"):
        raise RuntimeError(
            "FORCE_CUDA=1 but CUDA cannot be built: "
            + ("torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)")
        )

    sources = [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "cpu", "refine_cpu.cpp"),
               os.path.join("csrc", "cpu", "kernels_avx2.cpp")]
    include_dirs = [CSRC]
    define_macros = []
    extra = {"cxx": cxx_flags}
    library_dirs: list[str] = []
    link_args = _shared_cxx_runtime()

    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += cuda_sources
        wheel_inc, wheel_lib = _nvidia_wheel_dirs()
        include_dirs += wheel_inc
        library_dirs += wheel_lib
        define_macros += [
            ("USE_CUDA", None),  # declares the CUDA entries of the stable C shim (current stream, error text)
            ("SAVAE_FAST_WITH_CUDA", None),
            ("SAVAE_FAST_CUDA_ARCHS", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"'),
        ]
        nvcc_threads = os.environ.get("NVCC_THREADS", "2")
        extra["nvcc"] = opt + ["-lineinfo", f"--threads={nvcc_threads}"] + abi_flags
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension

    ext = ext_cls(
        name="savae_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_args,
        py_limited_api=True,
    )
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    print(f"savae_fast: building _C with {'CPU + CUDA' if use_cuda else 'CPU'} kernels", file=sys.stderr)
    return [ext], cmdclass

ext_modules, cmdclass = _extensions()
# Tag the wheel cp310-abi3: one wheel for every CPython >= 3.10.
setup(ext_modules=ext_modules, cmdclass=cmdclass,
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
