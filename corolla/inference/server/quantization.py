"""Serve a span's blocks with int8 or nf4 weights on CPU or CUDA, through bitsandbytes 0.50.

`platform serve --quant int8|nf4` turns every `nn.Linear` of the served blocks into a bitsandbytes
layer holding frozen quantized weights, so more blocks fit in memory; norms and the rest stay as
they are. Gradients still flow back to the input: training sends them through frozen remote blocks.

bitsandbytes quantizes when a parameter moves to a device, and `.to("cpu")` on a CPU tensor counts:
`Int8Params.to` calls `bnb.functional.int8_vectorwise_quant` (int8 rows, one absmax scale per row,
via float16); `Params4bit.to` calls `bnb.functional.quantize_4bit` (nf4 in blocks of 64 weights,
block scales quantized again to 8 bits). int8 also quantizes activations per token (LLM.int8());
activation columns holding a value of 6 or more stay in 16 bits.

Measured here (relative L2 error against the fp32 module, fixed seeds; the Llama layer's error is of
what it adds to its residual input, where bf16 rounding alone gives 1.8e-2), bytes against fp32:

    mode  compute   two MLPs 64-256-64  Llama layer  1024x1024  bytes: 1024x1024 (tiny layers)
    int8  float32   1.2e-2              1.3e-2       0.9e-2     0.25 (0.27)
    int8  bfloat16  1.2e-2              2.2e-2       0.9e-2
    nf4   float32   1.2e-1              1.5e-1       0.9e-1     0.13 (0.15-0.18)
    nf4   bfloat16  1.2e-1              1.5e-1       0.9e-1

Time for a 1024x1024 layer against the same layer unquantized (2 CPU threads, AVX-512):
8x128 tokens fp32 int8 0.9x, nf4 1.1x; bf16 int8 3.1x, nf4 1.2x. One token: int8 3x, nf4 4-5x.

How the bitsandbytes layers are set up, and why:
- `Linear4bit` on a CPU with AVX512-BF16 repacks its weights in place on its first no-grad eval
  forward, then takes a bfloat16-only path without autograd: a later forward needing input
  gradients crashes, two first forwards race on the repacking, float32 compute becomes bfloat16.
  We turn repacking off. Packed is 4x faster for one token (0.08 ms against 0.32) and 2.3x slower
  for 8x128 tokens (17.6 ms against 7.6).
- `Linear8bitLt` moves its int8 weights into its matmul state on its first forward, and two
  threads doing that together can leave the state empty: we do it here. Biases are stored in the
  compute dtype so that forward never recasts them in place; feed inputs in that dtype too. Then
  concurrent forwards and backwards only read shared state (checked bit-exact with 8 threads).
- `Linear8bitLt`'s CPU path depends on `training`: eval (how servers run blocks) runs the int8
  matmul; training mode dequantizes the whole weight on every call. Activations pass through
  float16 in eval, so a value beyond +-65504 overflows.

Quantize after the block has its final dtype, with its weights still on the cpu: they are
quantized as they move to `device` (on cuda by bitsandbytes' CUDA kernels, the usual GPU path;
the rest of the block moves beside them). bitsandbytes' parameters do not survive a later
`.to(dtype)` or `.to(device)`, so nothing calls one on a quantized module. A server quantizes
block by block as it loads (`Checkpoint.load_span(quantize=block_quantizer(...))`), so it never
holds the whole float span (server/loading.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from itertools import chain
from types import ModuleType
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from corolla.inference.errors import ModelLoadError

__all__ = ["QuantMode", "block_quantizer", "quantize_linears", "quantized_bytes"]

QuantMode = Literal["int8", "nf4"]

# compute dtypes, indexed by "is the device cuda": CPU kernels have no float16 path worth serving
_COMPUTE_DTYPES = ((torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16, torch.float16))
_INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8(): activation columns with |x| >= 6 skip int8
_NF4_BLOCKSIZE = 64  # weights per nf4 scale; QLoRA's and bitsandbytes' default
_PROBE_MAX_REL_ERROR = 0.25  # far above what working kernels give (table above)


class _DropInt8CastWarning(logging.Filter):
    """bitsandbytes warns on every int8 forward of a non-float16 input; expected here, it would flood logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def quantize_linears(
    module: nn.Module,
    mode: QuantMode,
    *,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Replace, in place, every `nn.Linear` inside `module` by a bitsandbytes `mode` layer on
    `device`, and move the module's other parameters and buffers there; return `module`.

    Weights (on cpu) are quantized from their current values as they move to `device` (on cuda by
    bitsandbytes' CUDA kernels) and frozen; biases are kept in `compute_dtype`; bitsandbytes layers
    already there are kept. Nothing is replaced unless every layer quantizes. Raises
    `ModelLoadError` naming the mode and the reason for bad arguments, for a Linear subclass (it
    may bypass `forward`, as `nn.MultiheadAttention.out_proj` does), and when bitsandbytes cannot
    run on this machine.
    """
    target = torch.device(device)
    if mode not in get_args(QuantMode):
        raise ModelLoadError(f"quantization mode {mode!r} is not supported; use one of {get_args(QuantMode)}")
    allowed = _COMPUTE_DTYPES[target.type == "cuda"]
    if compute_dtype not in allowed:
        raise ModelLoadError(
            f"{mode} compute_dtype {compute_dtype} is not supported on {target.type}; use one of {allowed}"
        )
    if type(module) is nn.Linear:
        raise ModelLoadError(f"cannot replace a bare nn.Linear by {mode} in place; pass the module holding it")
    bnb = _import_bitsandbytes(mode)
    _probe(bnb, mode, compute_dtype, target)

    new: dict[int, nn.Module] = {}  # id of an nn.Linear -> its replacement, so shared layers stay shared
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for parent_name, parent in module.named_modules():
        for name, child in parent.named_children():
            if not isinstance(child, nn.Linear) or isinstance(child, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit):
                continue
            path = f"{parent_name}.{name}".lstrip(".")
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                raise ModelLoadError(
                    f"cannot quantize {path} to {mode}: only a plain nn.Linear on cpu can be, "
                    f"not a {type(child).__name__} on {child.weight.device}"
                )
            if id(child) not in new:
                bias = None if child.bias is None else child.bias.detach()
                new[id(child)] = _quantize(
                    bnb, mode, child.weight.detach(), bias, compute_dtype, device=target, where=path
                )
                new[id(child)].train(child.training)  # int8 picks its CPU path by training mode
            replacements.append((parent, name, new[id(child)]))
    for parent, name, layer in replacements:
        setattr(parent, name, layer)
    _move_unquantized(module, target, bnb)
    return module


def block_quantizer(mode: QuantMode, *, compute_dtype: torch.dtype) -> Callable[[nn.Module, torch.device], nn.Module]:
    """`quantize_linears` in `mode` as `Checkpoint.load_span(quantize=...)` calls it, block by block."""

    def quantize(block: nn.Module, device: torch.device) -> nn.Module:
        return quantize_linears(block, mode, compute_dtype=compute_dtype, device=device)

    return quantize


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters, buffers and the scales bitsandbytes keeps beside them.

    Each storage counts once (an int8 layer's weight and matmul state share one), so the figure
    compares directly with the same sum for the unquantized module.
    """
    sizes: dict[int, int] = {}
    for tensor in chain(module.parameters(), module.buffers(), _bnb_side_tensors(module)):
        sizes[tensor.data_ptr()] = max(sizes.get(tensor.data_ptr(), 0), tensor.numel() * tensor.element_size())
    return sum(sizes.values())


def _import_bitsandbytes(mode: str) -> ModuleType:
    """Imported on first use, so a server without `--quant` never loads it."""
    try:
        import bitsandbytes as bnb
    except (ImportError, OSError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot quantize to {mode}: bitsandbytes does not import: {exc}") from exc
    cast_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in cast_logger.filters):
        cast_logger.addFilter(_DropInt8CastWarning())
    return bnb


def _move_unquantized(module: nn.Module, device: torch.device, bnb: ModuleType) -> None:
    """Every parameter and buffer outside the bitsandbytes layers to `device`. Not `module.to()`:
    that would rebuild the quantized parameters (and bitsandbytes' state with them)."""
    quantized = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, quantized):
                continue
            for name, param in sub.named_parameters(recurse=False):
                if param.device != device:
                    sub._parameters[name] = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer.device != device:
                    sub._buffers[name] = buffer.to(device)


_probed: set[tuple[str, torch.dtype, torch.device]] = set()  # (mode, compute dtype, device) that passed


def _probe(bnb: ModuleType, mode: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Run one small quantized layer forward and back, so broken kernels fail the load, not a request.
    Once per process for each mode, dtype and device (a span quantizes block by block).

    Inputs are fixed rather than drawn from the caller's random generator.
    """
    if (mode, compute_dtype, device) in _probed:
        return
    with torch.inference_mode(False), torch.enable_grad():  # the caller may load under no_grad
        weight = torch.linspace(-1.0, 1.0, 64 * 64).reshape(64, 64).T.contiguous()
        x = torch.linspace(-2.0, 2.0, 4 * 64).reshape(4, 64).to(device, compute_dtype).requires_grad_()
        bias = torch.zeros(64)
        layer = _quantize(bnb, mode, weight, bias, compute_dtype, device=device, where="a probe layer").eval()
        try:
            out = layer(x)
            out.sum().backward()
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"bitsandbytes cannot run {mode} on this machine: {exc}") from exc
    expected = F.linear(x.detach().float().cpu(), weight)
    error = ((out.detach().float().cpu() - expected).norm() / expected.norm()).item()
    grad_ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
    if not (error < _PROBE_MAX_REL_ERROR and grad_ok):
        raise ModelLoadError(
            f"bitsandbytes {mode} is wrong on this machine: relative error {error:.3g} (at most "
            f"{_PROBE_MAX_REL_ERROR}), input gradient {'finite' if grad_ok else 'missing or not finite'}"
        )
    _probed.add((mode, compute_dtype, device))


def _quantize(
    bnb: ModuleType,
    mode: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype,
    *,
    device: torch.device,
    where: str,
) -> nn.Module:
    """One bitsandbytes layer holding `weight` (out, in, on cpu) quantized on `device`; built on
    meta, so no random init. bitsandbytes quantizes as the weight moves off the cpu (module docstring)."""
    out_features, in_features = weight.shape
    layer: Any  # a bitsandbytes class, reached through the untyped `bnb` module object
    try:
        if mode == "int8":
            layer = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                threshold=_INT8_OUTLIER_THRESHOLD, device="meta",
            )  # fmt: skip
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
            layer.init_8bit_state()  # forward does this lazily, racing when two threads call it first
            if not torch.isfinite(layer.state.SCB).all():
                raise ValueError("weights exceed the float16 range int8 quantization goes through")
        else:
            layer = bnb.nn.Linear4bit(
                in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                compress_statistics=True, quant_type="nf4", device="meta",
            )  # fmt: skip
            layer.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, blocksize=_NF4_BLOCKSIZE, compress_statistics=True,
                quant_type="nf4", module=layer,
            ).to(device)  # fmt: skip
            layer.support_avx512bf16_for_cpu = False  # no in-place repacking (module docstring)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"bitsandbytes cannot quantize {where} to {mode} on this machine: {exc}") from exc
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device, compute_dtype), requires_grad=False)
    quantized: nn.Module = layer
    return quantized


def _bnb_side_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Tensors bitsandbytes keeps outside parameters and buffers: int8 row scales, nf4 block scales."""
    for sub in module.modules():
        lt_state = getattr(sub, "state", None)  # Linear8bitLt's MatmulLtState
        found = [getattr(lt_state, "CB", None), getattr(lt_state, "SCB", None)]
        quant_state = getattr(getattr(sub, "weight", None), "quant_state", None)  # Params4bit's QuantState
        while quant_state is not None:  # its state2 holds the scales of the 8-bit block scales
            found += [quant_state.absmax, quant_state.code, quant_state.offset]
            quant_state = getattr(quant_state, "state2", None)
        yield from (t for t in found if isinstance(t, torch.Tensor))
