"""Where a server's span or a client's embeddings and head compute: `--device cpu|cuda|auto`.

`auto` is cuda when torch sees a CUDA device, else cpu. The dtypes a device computes in:

    device  float32  bfloat16                       float16
    cpu     yes      yes                            no: use bfloat16 (same size, float32's range)
    cuda    yes      on GPUs with native bfloat16   yes
                     (compute capability 8.0+: A100, H100; refused on older ones)

float16 on CPU is refused rather than served: torch's CPU float16 matmuls are slower than
float32 on most CPUs, and float16's range (65504) overflows on real activations where bfloat16
does not. Everything here raises `DeviceError` (exit 15) with one line naming the flag.
"""

from __future__ import annotations

from enum import Enum

import torch

from corolla.inference.errors import DeviceError

__all__ = ["DeviceKind", "check_dtype", "resolve_device"]


class DeviceKind(Enum):
    AUTO = "auto"  # cuda when available, else cpu
    CPU = "cpu"
    CUDA = "cuda"


def resolve_device(kind: DeviceKind | str) -> torch.device:
    """The torch device `kind` names on this machine; `DeviceError` for cuda where there is none."""
    try:
        kind = DeviceKind(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in DeviceKind)
        raise DeviceError(f"device {kind!r} is not supported; use one of {allowed}") from None
    if kind == DeviceKind.CPU:
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == DeviceKind.AUTO:
        return torch.device("cuda" if available else "cpu")
    if not available:
        reason = "this torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise DeviceError(f"--device cuda: no CUDA device on this machine ({reason}); use --device cpu or auto")
    return torch.device("cuda", torch.cuda.current_device())


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """`DeviceError` unless `device` computes in `dtype` (the table in the module docstring)."""
    name = str(dtype).removeprefix("torch.")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise DeviceError(f"--dtype {name} is not supported; use float32, bfloat16 or float16 (cuda only)")
    if device.type == "cpu" and dtype == torch.float16:
        raise DeviceError("--dtype float16 is for --device cuda; on cpu use bfloat16 (same size, float32's range)")
    if (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        raise DeviceError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use float16")
