"""Loading the span a server serves: on its device, quantized block by block, memory given back.

Memory, measured on SmolLM2-135M blocks 0:15 (docs/inference.md, "Memory per mode"): a
quantized server used to hold more than a float32 one, for three reasons, each fixed here or
where it arose:
- tensors read from safetensors stayed backed by the file's memory map, and the small norm
  weights kept the whole map alive, so every page ever read (the float weights before
  quantization included) stayed resident: `Checkpoint.read` now copies each tensor;
- Llama's fused q/k/v and gate/up tensors outlived the layers quantization replaced:
  `llama._FusedOwner` now releases them as the layers are replaced;
- the whole float span was loaded before any of it was quantized: `load_span(quantize=...)`
  now quantizes each block as soon as it is read, then the allocator's freed pages go back to
  the operating system (`_release_freed_memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc

import torch
from torch import nn

from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.models.span import Span
from corolla.inference.server.quantization import QuantMode, block_quantizer

__all__ = ["load_served_span"]


def load_served_span(
    checkpoint: Checkpoint,
    start: int,
    end: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantMode | None,
) -> Span:
    """Blocks `[start, end)` as a server serves them: weights in `dtype` on `device`, quantized
    to `quant` block by block (bitsandbytes is imported only then)."""
    quantize = None
    if quant is not None:
        to_quant = block_quantizer(quant, compute_dtype=dtype)

        def quantize(block: nn.Module, device: torch.device) -> None:
            to_quant(block, device)
            _release_freed_memory()  # the block's float weights: the peak stays one block above the end

    span = checkpoint.load_span(start, end, dtype=dtype, device=device, quantize=quantize)
    _release_freed_memory()
    return span


def _release_freed_memory() -> None:
    """Give the pages freed while loading (float copies, cast and quantization temporaries)
    back to the operating system. glibc keeps freed heap memory for reuse, so without this a
    server's resident memory keeps the peak of its load; elsewhere (musl, macOS) nothing to do."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)
