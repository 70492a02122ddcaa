"""The computation a server offers on its span: forward, backward, cached inference steps.

Requests may name any sub-span `[start, end)` of the served span. Inputs arrive on the
cpu (from the wire) in the client's dtype and are computed on the span's device (`--device`)
in the server's dtype (`--dtype`); outputs go back to the cpu in the dtype they came in, so a
client never has to know where or how a server computes. KV caches live on the device.

Work stops between blocks when the call it is for ends: the service runs each call's
computation `watched` by a check (caller gone, deadline passed, peer revoked) that runs
before every block and raises to stop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from corolla.inference.errors import BadRequestError, MaxLengthExceededError, SpanNotServedError
from corolla.inference.models.kv_cache import SpanCache
from corolla.inference.models.lora import SpanAdapter
from corolla.inference.models.span import Span
from corolla.inference.wire.adapters import tensor_name
from corolla.inference.wire.backward import AdapterGrads, BackwardResult


def clip_sum(per_sample: dict[str, torch.Tensor], clip_factors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum over samples of `clip_factors[b] * grad[b]`: Opacus's `clip_and_accumulate` formula."""
    return {name: torch.einsum("i,i...", clip_factors, g) for name, g in per_sample.items()}


_watch = threading.local()  # `.check`: what this thread runs before each block, if anything


@contextmanager
def watched(check: Callable[[], None]) -> Iterator[None]:
    """Run `check` on this thread before every block computed inside the `with` body;
    an exception it raises stops the computation and leaves the body."""
    previous = getattr(_watch, "check", None)
    _watch.check = check
    try:
        yield
    finally:
        _watch.check = previous


class SpanBackend:
    def __init__(self, span: Span, *, model_id: str, hidden_size: int, dtype: torch.dtype, quant: str | None):
        self.span = span
        self.model_id = model_id
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.quant = quant
        self.device = span.device
        self.blocks_computed = 0  # blocks started, every call together: a work counter
        for block in span.blocks:
            block.register_forward_pre_hook(self._before_block)

    def _before_block(self, module: nn.Module, args: object) -> None:
        check = getattr(_watch, "check", None)
        if check is not None:
            check()
        self.blocks_computed += 1

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    def check_request(self, model_id: str, start: int, end: int) -> None:
        if model_id and model_id != self.model_id:
            raise SpanNotServedError(f"this server serves model {self.model_id!r}, not {model_id!r}")
        if not self.start <= start < end <= self.end:
            raise SpanNotServedError(
                f"blocks {start}:{end} are not held here; this server holds {self.start}:{self.end}"
            )

    def check_hidden(self, hidden: torch.Tensor, name: str = "hidden") -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise BadRequestError(f"{name}: shape {tuple(hidden.shape)} is not (batch, tokens, {self.hidden_size})")
        if hidden.shape[0] == 0 or hidden.shape[1] == 0:
            raise BadRequestError(f"{name}: empty batch or sequence {tuple(hidden.shape)}")
        if not torch.isfinite(hidden).all():
            raise BadRequestError(f"{name}: contains NaN or infinite values")

    def forward(
        self, hidden: torch.Tensor, start: int, end: int, *, adapter: SpanAdapter | None = None
    ) -> torch.Tensor:
        self.check_hidden(hidden)
        with torch.inference_mode():
            out = self.span(self._in(hidden), start=start, end=end, adapter=adapter)
        return out.to("cpu", hidden.dtype)

    def _in(self, hidden: torch.Tensor) -> torch.Tensor:
        """A request's tensor on the span's device, in the compute dtype."""
        return hidden.to(self.device, self.dtype, non_blocking=hidden.is_pinned())

    def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        start: int,
        end: int,
        *,
        adapter: SpanAdapter | None = None,
        adapter_grads: AdapterGrads = AdapterGrads.NONE,
        grad_input: bool = True,
    ) -> BackwardResult:
        """Gradients of `sum(out * grad_output)`: with respect to `hidden` (base weights stay
        frozen) and, per sample, with respect to the adapter's weights in `[start, end)`.

        Per-sample gradients are exact: every sample gets its own copy of each LoRA weight,
        so autograd's gradient of copy `b` is sample `b`'s gradient (what Opacus computes
        from the captured activations and output gradients)."""
        self.check_hidden(hidden)
        if grad_output.shape != hidden.shape:
            raise BadRequestError(
                f"grad_output: shape {tuple(grad_output.shape)} differs from hidden {tuple(hidden.shape)}"
            )
        self.check_hidden(grad_output, "grad_output")
        if adapter_grads != AdapterGrads.NONE and adapter is None:
            raise BadRequestError("adapter gradients were asked for without an adapter")
        batch = hidden.shape[0]
        leaves: dict[str, torch.Tensor] = {}
        run_adapter = adapter
        if adapter is not None and adapter_grads != AdapterGrads.NONE:
            pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
            for index in range(start, end):
                block = adapter.block(index)
                for module, (a, b) in block.pairs.items() if block is not None else ():
                    a_n = a.unsqueeze(0).repeat(batch, 1, 1).requires_grad_(True)  # (B, r, in)
                    b_n = b.unsqueeze(0).repeat(batch, 1, 1).requires_grad_(True)  # (B, out, r)
                    leaves[tensor_name(index, module, "lora_A")] = a_n
                    leaves[tensor_name(index, module, "lora_B")] = b_n
                    pairs[(index, module)] = (a_n, b_n)
            run_adapter = SpanAdapter.from_pairs(pairs, adapter.scaling)
        if not grad_input and not leaves:
            raise BadRequestError("nothing to compute: no input gradient and no adapter weights in these blocks")
        with torch.enable_grad():
            inputs = self._in(hidden).detach().requires_grad_(grad_input)
            out = self.span(inputs, start=start, end=end, adapter=run_adapter)
            targets = ([inputs] if grad_input else []) + list(leaves.values())
            grads = list(torch.autograd.grad(out, targets, self._in(grad_output).to(out.dtype), allow_unused=True))
        g_in = grads.pop(0).to("cpu", hidden.dtype) if grad_input else None
        # back to the cpu: they go on the wire or wait in the server's gradient store for ClipSum
        per_sample = {
            name: torch.zeros(leaf.shape) if g is None else g.to("cpu", torch.float32)
            for (name, leaf), g in zip(leaves.items(), grads, strict=True)
        }
        norms = None
        if adapter_grads == AdapterGrads.NORMS:
            norms = torch.zeros(batch, dtype=torch.float32)
            for g in per_sample.values():
                norms += g.reshape(batch, -1).pow(2).sum(dim=1)
        return BackwardResult(grad_input=g_in, per_sample=per_sample, squared_norms=norms)

    def new_cache(self, start: int, end: int, *, batch_size: int, max_length: int) -> SpanCache:
        return self.span.new_cache(start=start, end=end, batch_size=batch_size, max_length=max_length, dtype=self.dtype)

    def cache_bytes(self, start: int, end: int, *, batch_size: int, max_length: int) -> int:
        return self.span.cache_bytes(
            start=start, end=end, batch_size=batch_size, max_length=max_length, dtype=self.dtype
        )

    def step(
        self,
        hidden: torch.Tensor,
        *,
        cache: SpanCache,
        position: int,
        start: int,
        end: int,
        adapter: SpanAdapter | None = None,
    ) -> torch.Tensor:
        """Run `T` new tokens at `position..position+T` through the cached session."""
        self.check_hidden(hidden)
        if hidden.shape[0] != cache.batch_size:
            raise BadRequestError(f"hidden: batch {hidden.shape[0]} differs from the session's {cache.batch_size}")
        if position + hidden.shape[1] > cache.max_length:
            raise MaxLengthExceededError(
                f"{position + hidden.shape[1]} tokens would exceed the session's max_length {cache.max_length}"
            )
        with torch.inference_mode():
            out = self.span(self._in(hidden), start=start, end=end, offset=position, cache=cache, adapter=adapter)
        return out.to("cpu", hidden.dtype)
