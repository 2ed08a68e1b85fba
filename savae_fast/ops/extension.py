"""Loading of the compiled extension and probes for which kernels it has.

The extension (``savae_fast._C``) is built on the LibTorch stable ABI for the
oldest supported torch, so one build loads under every later torch. Importing it
registers the savae_fast:: operators; what is not an operator (build
information, the CPU vector-kernel switch) is a small C interface read with ctypes.
"""

from __future__ import annotations

import ctypes
import json
import warnings

import torch

OP_NAMES = ("sample", "forward_step", "reverse_direction", "reverse_update", "accumulate_")
TORCH_TARGET = "2.11"  # the stable-ABI target of setup.py: the oldest torch the extension loads under


def _load():
    try:  # importing _C registers the savae_fast:: operators and their CPU/CUDA kernels
        from savae_fast import _C  # type: ignore[attr-defined]
    except ModuleNotFoundError as exc:
        if exc.name != "savae_fast._C":
            raise
        return None, None, exc  # built without the extension (SAVAE_FAST_SKIP_EXT=1): the fallback warns on use
    except ImportError as exc:  # present but not loadable: say why and how to fix it, once (here)
        warnings.warn(
            f"savae_fast: the compiled kernels failed to load ({exc}). They need torch >= {TORCH_TARGET} "
            f"(found {torch.__version__}); reinstall with `pip install --force-reinstall --no-cache-dir "
            "savae_fast` (or rebuild this checkout). Until then the pure-PyTorch operators are used.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, None, exc
    lib = ctypes.CDLL(_C.__file__)  # the same, already loaded library
    lib.savae_fast_build_info.restype = ctypes.c_char_p
    lib.savae_fast_cpu_vector_kernels.restype = ctypes.c_int
    lib.savae_fast_set_cpu_vector_kernels.restype = ctypes.c_int
    lib.savae_fast_set_cpu_vector_kernels.argtypes = [ctypes.c_int]
    if hasattr(lib, "savae_fast_cuda_single_block_max_elements"):  # CUDA builds
        lib.savae_fast_cuda_single_block_max_elements.restype = ctypes.c_int64
        lib.savae_fast_set_cuda_single_block_max_elements.restype = None
        lib.savae_fast_set_cuda_single_block_max_elements.argtypes = [ctypes.c_int64]
    return _C, lib, None


_C, _LIB, EXTENSION_ERROR = _load()


def extension_loaded() -> bool:
    """Whether the compiled extension (``savae_fast._C``) imported.

    Returns:
        ``True`` when the ``torch.ops.savae_fast`` operators have compiled kernels; without
        it, refine runs the pure-PyTorch operators (and says so once).

    Example:
        >>> isinstance(extension_loaded(), bool)
        True
    """
    return _C is not None


def build_info() -> dict:
    """How the extension was built ({} when it is not available): ``cuda_kernels_compiled``
    (whether CUDA kernels are compiled in: they may be on a machine without a GPU; whether
    one runs here is ``torch.cuda.is_available()``, see ``savae-fast info``), ``cuda_archs``,
    ``torch_target_version``, ``compiler``, ``cpu_vector_kernels`` (whether the AVX2 loops
    are compiled in and this CPU runs them).

    Returns:
        A dict of those keys; ``{}`` without the extension.

    Example:
        >>> sorted(build_info())  # doctest: +SKIP
        ['compiler', 'cpu_vector_kernels', 'cuda_archs', 'cuda_kernels_compiled', 'torch_target_version']
    """
    if _LIB is None:
        return {}
    info = json.loads(_LIB.savae_fast_build_info().decode())
    if "cuda" in info:  # (the extension's own name for it)
        info = {"cuda_kernels_compiled": info.pop("cuda"), **info}
    return info


def cpu_vector_kernels() -> bool:
    """Whether the CPU operators use their AVX2 loops.

    Returns:
        ``True`` when the AVX2 loops are compiled in, this CPU has AVX2+FMA and they are
        enabled (:func:`set_cpu_vector_kernels`); ``False`` without the extension.

    Example:
        >>> isinstance(cpu_vector_kernels(), bool)
        True
    """
    return bool(_LIB.savae_fast_cpu_vector_kernels()) if _LIB is not None else False


def set_cpu_vector_kernels(enabled: bool) -> None:
    """Use the AVX2 (True) or the portable (False) loops of the CPU operators
    (the environment variable SAVAE_FAST_CPU_VECTOR=0 sets False at load).

    Args:
        enabled: ``True``: the AVX2 loops; ``False``: the portable loops (the same results
            to rounding; for tests and comparison).

    Returns:
        ``None``.

    Raises:
        RuntimeError: the extension is not loaded, or ``enabled`` is ``True`` on a CPU or a
            build without AVX2+FMA.

    Example:
        >>> set_cpu_vector_kernels(False)  # doctest: +SKIP
    """
    if _LIB is None:
        raise RuntimeError(f"savae_fast: the compiled extension is not loaded ({EXTENSION_ERROR})")
    if _LIB.savae_fast_set_cpu_vector_kernels(int(bool(enabled))) != 0:
        raise RuntimeError("savae_fast: the vectorised CPU kernels need AVX2+FMA (and a GCC x86-64 build)")


def cuda_single_block_max_elements() -> int | None:
    """Up to how many elements the CUDA forward_step and reverse_direction run their
    whole-tensor reduction and element-wise part as one launch of one block (above it:
    two launches over the whole GPU).

    Returns:
        The limit in elements, or ``None`` without CUDA kernels.

    Example:
        >>> cuda_single_block_max_elements()  # doctest: +SKIP
        16384
    """
    if _LIB is None or not hasattr(_LIB, "savae_fast_cuda_single_block_max_elements"):
        return None
    return int(_LIB.savae_fast_cuda_single_block_max_elements())


def set_cuda_single_block_max_elements(numel: int) -> None:
    """Set the limit of :func:`cuda_single_block_max_elements` (process-wide). For tests and tuning.

    Args:
        numel: elements; 0: always two launches.

    Returns:
        ``None``.

    Raises:
        RuntimeError: the extension has no CUDA kernels.
        ValueError: ``numel`` is not an int >= 0.

    Example:
        >>> set_cuda_single_block_max_elements(0)  # doctest: +SKIP
    """
    if cuda_single_block_max_elements() is None:
        raise RuntimeError("savae_fast: the compiled extension has no CUDA kernels")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"savae_fast: argument 'numel' must be an int >= 0, got {numel!r}")
    _LIB.savae_fast_set_cuda_single_block_max_elements(numel)


_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.savae_fast.<op>`` has a compiled kernel for this device type.

    Args:
        op: an operator name (one of ``OP_NAMES``).
        device_type: ``"cpu"`` or ``"cuda"`` (others: ``False``).

    Returns:
        ``True`` when the kernel is registered for that dispatch key.

    Example:
        >>> has_kernel("forward_step", "cpu")  # doctest: +SKIP
        True
    """
    if _C is None or device_type not in _DISPATCH_KEY:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"savae_fast::{op}", _DISPATCH_KEY[device_type])


# Fixed once the extension is imported; a plain dict lookup also traces under torch.compile.
_AVAILABLE = {dt: all(has_kernel(op, dt) for op in OP_NAMES) for dt in _DISPATCH_KEY}


def available(device: torch.device | str) -> bool:
    """Whether every compiled savae_fast kernel exists for ``device``.

    Args:
        device: a device or its name.

    Returns:
        ``True`` when ``backend="cpp"`` can run on tensors there.

    Example:
        >>> available("cpu")  # doctest: +SKIP
        True
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _AVAILABLE.get(device_type, False)
