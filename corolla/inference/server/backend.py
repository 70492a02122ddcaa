"""The computation a server offers on its span: forward, backward, cached inference steps.

Requests may name any sub-span `[start, end)` of the served span. Inputs arrive in the
client's dtype and are computed in the server's (`--dtype`); outputs go back in the
dtype they came in, so a client never has to know how a server computes.
"""

from __future__ import annotations

import torch

from corolla.inference.errors import BadRequestError, MaxLengthExceededError, SpanNotServedError
from corolla.inference.models.kv_cache import SpanCache
from corolla.inference.models.span import Span


class SpanBackend:
    def __init__(self, span: Span, *, model_id: str, hidden_size: int, dtype: torch.dtype, quant: str | None):
        self.span = span
        self.model_id = model_id
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.quant = quant

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

    def forward(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        self.check_hidden(hidden)
        with torch.inference_mode():
            out = self.span(hidden.to(self.dtype), start=start, end=end)
        return out.to(hidden.dtype)

    def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Gradient of `sum(out * grad_output)` with respect to `hidden`; weights stay frozen."""
        self.check_hidden(hidden)
        if grad_output.shape != hidden.shape:
            raise BadRequestError(
                f"grad_output: shape {tuple(grad_output.shape)} differs from hidden {tuple(hidden.shape)}"
            )
        with torch.enable_grad():
            inputs = hidden.to(self.dtype).detach().requires_grad_(True)
            out = self.span(inputs, start=start, end=end)
            (grad,) = torch.autograd.grad(out, inputs, grad_output.to(out.dtype))
        return grad.to(hidden.dtype)

    def new_cache(self, start: int, end: int, *, batch_size: int, max_length: int) -> SpanCache:
        return self.span.new_cache(start=start, end=end, batch_size=batch_size, max_length=max_length, dtype=self.dtype)

    def cache_bytes(self, start: int, end: int, *, batch_size: int, max_length: int) -> int:
        return self.span.cache_bytes(
            start=start, end=end, batch_size=batch_size, max_length=max_length, dtype=self.dtype
        )

    def step(self, hidden: torch.Tensor, *, cache: SpanCache, position: int, start: int, end: int) -> torch.Tensor:
        """Run `T` new tokens at `position..position+T` through the cached session."""
        self.check_hidden(hidden)
        if hidden.shape[0] != cache.batch_size:
            raise BadRequestError(f"hidden: batch {hidden.shape[0]} differs from the session's {cache.batch_size}")
        if position + hidden.shape[1] > cache.max_length:
            raise MaxLengthExceededError(
                f"{position + hidden.shape[1]} tokens would exceed the session's max_length {cache.max_length}"
            )
        with torch.inference_mode():
            out = self.span(hidden.to(self.dtype), start=start, end=end, offset=position, cache=cache)
        return out.to(hidden.dtype)
