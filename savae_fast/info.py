"""What savae_fast has and runs on this machine: ``savae-fast info`` or ``python -m savae_fast.info``.

Versions (package, Python, torch, Triton, CUDA), how the compiled extension was built, which
backends of refine's operators run here and which ``backend="auto"`` picks per device, the
float32 precision settings and the difference steps refine would pick under them, and which
``hvp`` modes run on each device. Every part that is missing says why in one line; the
command exits 0 (it reports, it does not judge).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys


def _triton() -> tuple[str | None, str]:
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to report
        return None, f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
    return triton.__version__, ""


def devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_report(device: str) -> dict:
    """Per backend of the operators: runs here (True) or the reason it does not; and auto's pick."""
    from savae_fast import ops

    out = {}
    out["cpp"] = True if ops.available(device) else (
        f"the compiled extension is not loaded ({ops.EXTENSION_ERROR})" if not ops.extension_loaded()
        else f"the extension was built without {device} kernels")
    if ops.triton_available(device):
        out["triton"] = True
    else:
        out["triton"] = ("Triton kernels run on GPUs (on CPU tensors only under TRITON_INTERPRET=1, for tests)"
                         if device == "cpu" else "Triton is not importable")
    out["torch"] = True
    try:
        auto = ops.get_backend("auto", device).name
    except Exception as exc:  # noqa: BLE001
        auto = f"none ({exc})"
    return {"backends": out, "auto": auto}


def precision_report(device: str) -> dict:
    """The float32 settings that make the decoder compute below float32, the precision refine
    infers from them, and the default difference step of each mode there."""
    import torch

    from savae_fast.refine.hvp import HVP_METHODS
    from savae_fast.refine.precision import decoder_precision, reduced_fp32_settings

    reduced = reduced_fp32_settings(device)
    precision = decoder_precision(torch.zeros(1, 1, device=device), reduced=reduced)  # (dtype and device type)
    name = precision if isinstance(precision, str) else str(precision).replace("torch.", "")
    steps = {m.name: m.default_fd_eps.get(precision) for m in HVP_METHODS.values() if m.default_fd_eps}
    return {"reduced_fp32_settings": reduced, "decoder_precision": name, "default_fd_eps": steps,
            "oneDNN": bool(torch.backends.mkldnn.is_available()) if device == "cpu" else None,
            "cudnn": (bool(torch.backends.cudnn.is_available()) and torch.backends.cudnn.enabled)
            if device == "cuda" else None}


def hvp_report(device: str) -> dict:
    """Which hvp modes run on this device, and the limits that apply."""
    import torch

    from savae_fast.refine.hvp import HVP_METHODS

    out = {name: True for name in HVP_METHODS}
    if device == "cuda":
        out["jvp"] = ("runs, but PyTorch's CUDA LSTM / GRU cells and dropout's backward have no forward-mode "
                      "derivative: recurrent decoders or active dropout need 'exact' or a difference mode")
        if torch.backends.cudnn.enabled:
            out["exact"] = "runs; evaluations through cuDNN RNNs are rerun without cuDNN (no double backward there)"
    return out


def collect() -> dict:
    import torch

    import savae_fast
    from savae_fast import ops
    from savae_fast.testing import cpu_bfloat16_lstm

    triton_version, triton_why = _triton()
    info = {
        "savae_fast": savae_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version or triton_why,
        "extension": ops.build_info() or f"not loaded ({ops.EXTENSION_ERROR})",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
        "none (torch.cuda.is_available() is False)",
        "threads": torch.get_num_threads(),
        "cpu_bfloat16_lstm": True if cpu_bfloat16_lstm()[0] else cpu_bfloat16_lstm()[1],
        "devices": {},
    }
    for device in devices():
        info["devices"][device] = {**backend_report(device), "precision": precision_report(device),
                                   "hvp": hvp_report(device)}
    return info


def _line(value) -> str:
    if value is True:
        return "yes"
    return str(value)


def format_report(info: dict) -> str:
    lines = [f"savae_fast {info['savae_fast']}  (Python {info['python']}, {info['platform']})",
             f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none: a CPU build'}), Triton {info['triton']}",
             f"GPU: {info['gpu']}", f"CPU threads: {info['threads']}"]
    ext = info["extension"]
    if isinstance(ext, dict):
        lines.append("extension: " + ", ".join(f"{k} {v}" for k, v in ext.items()))
    else:
        lines.append(f"extension: {ext}")
    lines.append(f"CPU bfloat16 autocast of nn.LSTM: {_line(info['cpu_bfloat16_lstm'])}")
    for device, d in info["devices"].items():
        lines.append(f"[{device}] backend='auto' uses: {d['auto']}")
        for name, ok in d["backends"].items():
            lines.append(f"[{device}]   backend {name}: {_line(ok)}")
        p = d["precision"]
        settings = ", ".join(f"{k}={v!r}" for k, v in p["reduced_fp32_settings"].items()) or "none (full float32)"
        lines.append(f"[{device}] reduced float32 precision settings: {settings}; the decoder computes in "
                     f"{p['decoder_precision']}")
        lines.append(f"[{device}] default fd_eps: " + ", ".join(f"{k} {v:g}" for k, v in p["default_fd_eps"].items()
                                                                if v is not None))
        for name, ok in d["hvp"].items():
            lines.append(f"[{device}]   hvp {name}: {_line(ok)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="savae-fast info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1, default=str) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
