"""Fault injection, for tests and benchmarks only: a server that corrupts some of its outputs.

`platform serve --inject-fault KIND:F[:SEED]` (hidden from `--help`) wraps the server's
`SpanBackend` in a `FaultInjectingBackend`. Each output the server sends back (a forward's
hidden states, an inference step's hidden states, a backward's input gradient together
with its adapter gradients) is corrupted with probability F, decided per call by this
module's own RNG (seeded by SEED, else from the OS), independently of anything the client
sends. So the server cannot know, and does not care, which of its answers will be audited.

Kinds:

- `noise`: add Gaussian noise of standard deviation `NOISE_SCALE` (25%) times the output's
  RMS, drawn per tensor (each adapter gradient at its own RMS). The relative L2 error is
  then about 0.25, many times any calibrated tolerance between honest precisions.
- `skip-block`: leave out the last block of the requested span (a one-block request
  returns its input, and a backward through it returns `grad_output`, with zero adapter
  gradients for the skipped block). An inference step still runs the skipped block to keep
  the session's cache whole, so only the corrupted step's answer is wrong, not later ones.
- `other-weights`: compute with a copy of the span whose weight matrices are redrawn with
  another seed (same shapes, same per-matrix standard deviation; norms and biases kept),
  quantized like the real span. Sessions keep a second KV cache for it, so a corrupted step
  is what the other model would have answered for the whole history.

The server logs a warning at start that it injects faults. Its records and `Info` replies
look like any honest server's: that is the point.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import threading
import weakref
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, cast

import torch

from corolla.inference.errors import BadRequestError
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.models.kv_cache import LayerCache, SpanCache
from corolla.inference.models.lora import SpanAdapter
from corolla.inference.models.span import Span
from corolla.inference.server.backend import SpanBackend
from corolla.inference.wire.backward import AdapterGrads, BackwardResult

if TYPE_CHECKING:
    from corolla.inference.server.quantization import QuantMode

__all__ = ["NOISE_SCALE", "FaultInjectingBackend", "FaultKind", "FaultSpec", "other_weights_span"]

log = logging.getLogger(__name__)

NOISE_SCALE = 0.25  # `noise`: standard deviation of the added noise, as a fraction of the output's RMS


class FaultKind(StrEnum):
    NOISE = "noise"  # additive Gaussian noise
    SKIP_BLOCK = "skip-block"  # the span's last block left out
    OTHER_WEIGHTS = "other-weights"  # weights of another seed


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultSpec:
    kind: FaultKind
    fraction: float  # probability that one output is corrupted, in (0, 1]
    seed: int | None = None  # the fault RNG's seed; None = from the OS

    def __post_init__(self) -> None:
        if not isinstance(self.kind, FaultKind):
            raise BadRequestError(f"fault kind {self.kind!r} is not known; allowed: {_KINDS}")
        if isinstance(self.fraction, bool) or not (isinstance(self.fraction, int | float) and 0 < self.fraction <= 1):
            raise BadRequestError(f"fault fraction={self.fraction!r} must be a number in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise BadRequestError(f"fault seed={self.seed!r} must be a non-negative integer")

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """`KIND:F` or `KIND:F:SEED`, e.g. `noise:0.01`, `skip-block:1.0`, `other-weights:0.3:7`."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise BadRequestError(f"--inject-fault must look like KIND:FRACTION[:SEED], got {text!r}")
        try:
            kind = FaultKind(parts[0])
        except ValueError:
            raise BadRequestError(f"fault kind {parts[0]!r} is not known; allowed: {_KINDS}") from None
        try:
            fraction = float(parts[1])
            seed = int(parts[2]) if len(parts) == 3 else None
        except ValueError:
            raise BadRequestError(f"--inject-fault {text!r}: FRACTION must be a number, SEED an integer") from None
        if not math.isfinite(fraction):
            raise BadRequestError(f"fault fraction={fraction!r} must be a number in (0, 1]")
        return cls(kind=kind, fraction=fraction, seed=seed)

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.fraction:g}" + ("" if self.seed is None else f":{self.seed}")


_KINDS = ", ".join(k.value for k in FaultKind)


def other_weights_span(
    checkpoint: Checkpoint,
    start: int,
    end: int,
    *,
    dtype: torch.dtype,
    quant: QuantMode | None,
    seed: int,
    device: torch.device | str = "cpu",
) -> Span:
    """Blocks `[start, end)` of `checkpoint` with every weight matrix redrawn from a seeded normal
    of the same standard deviation (vectors, i.e. norms and biases, kept), quantized like a real
    span and placed on `device`."""
    span = checkpoint.load_span(start, end, dtype=dtype)  # redrawn on the cpu: the same draws on every device
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(span.named_parameters()):
            if param.dim() >= 2:
                std = float(param.float().std())
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    if quant is not None:
        from corolla.inference.server.quantization import quantize_linears  # imports bitsandbytes

        quantize_linears(span, quant, compute_dtype=dtype, device=device)
    else:
        span.to(device)
    return span


class _CacheView:
    """Some layers of a session's cache, as the span code reads them (`layers[i]` by position)."""

    def __init__(self, cache: SpanCache, layers: list[LayerCache]) -> None:
        self.layers = layers
        self.batch_size = cache.batch_size
        self.max_length = cache.max_length


class FaultInjectingBackend(SpanBackend):
    """A `SpanBackend` whose outputs are corrupted with probability `spec.fraction` per call."""

    def __init__(self, inner: SpanBackend, spec: FaultSpec, *, other: Span | None = None) -> None:
        super().__init__(
            inner.span, model_id=inner.model_id, hidden_size=inner.hidden_size, dtype=inner.dtype, quant=inner.quant
        )
        if spec.kind == FaultKind.OTHER_WEIGHTS and other is None:
            raise BadRequestError("an other-weights fault needs the other span (see other_weights_span)")
        self.spec = spec
        self._other = (
            SpanBackend(
                other, model_id=inner.model_id, hidden_size=inner.hidden_size, dtype=inner.dtype, quant=inner.quant
            )
            if other is not None
            else None
        )
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        self._rng = random.Random(seed)
        self._noise = torch.Generator().manual_seed(self._rng.getrandbits(63))
        self._lock = threading.Lock()
        self._other_caches: dict[int, SpanCache] = {}  # id(session cache) -> the other model's cache
        self.calls = 0  # outputs produced
        self.corrupted = 0  # outputs corrupted

    # -- the three computations --------------------------------------------------------------

    def forward(
        self, hidden: torch.Tensor, start: int, end: int, *, adapter: SpanAdapter | None = None
    ) -> torch.Tensor:
        if not self._hit():
            return super().forward(hidden, start, end, adapter=adapter)
        kind = self.spec.kind
        if kind == FaultKind.NOISE:
            return self._noisy(super().forward(hidden, start, end, adapter=adapter))
        if kind == FaultKind.SKIP_BLOCK:
            if end - start > 1:
                return super().forward(hidden, start, end - 1, adapter=adapter)
            self.check_hidden(hidden)
            return hidden.clone()
        return self._alternative().forward(hidden, start, end, adapter=adapter)

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
        hit = self._hit()
        kind = self.spec.kind
        if kind == FaultKind.OTHER_WEIGHTS:  # both models step every time: both caches stay whole
            out = super().step(hidden, cache=cache, position=position, start=start, end=end, adapter=adapter)
            other = self._alternative().step(
                hidden,
                cache=self._other_cache(cache, start, end),
                position=position,
                start=start,
                end=end,
                adapter=adapter,
            )
            return other if hit else out
        if kind == FaultKind.SKIP_BLOCK and hit:
            first = _CacheView(cache, cache.layers[:-1])
            last = _CacheView(cache, cache.layers[-1:])
            if end - start > 1:
                mid = super().step(
                    hidden, cache=cast(SpanCache, first), position=position, start=start, end=end - 1, adapter=adapter
                )
            else:
                mid = hidden
            # the skipped block still fills its cache, so later steps are honest again
            super().step(mid, cache=cast(SpanCache, last), position=position, start=end - 1, end=end, adapter=adapter)
            return mid.clone()
        out = super().step(hidden, cache=cache, position=position, start=start, end=end, adapter=adapter)
        return self._noisy(out) if hit else out

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
        honest = super().backward(
            hidden, grad_output, start, end, adapter=adapter, adapter_grads=adapter_grads, grad_input=grad_input
        )
        if not self._hit():
            return honest
        kind = self.spec.kind
        if kind == FaultKind.NOISE:
            g_in = None if honest.grad_input is None else self._noisy(honest.grad_input)
            per_sample = {name: self._noisy(g) for name, g in honest.per_sample.items()}
        elif kind == FaultKind.SKIP_BLOCK:
            if end - start > 1:
                short = super().backward(
                    hidden,
                    grad_output,
                    start,
                    end - 1,
                    adapter=adapter,
                    adapter_grads=adapter_grads,
                    grad_input=grad_input,
                )
                g_in, kept = short.grad_input, short.per_sample
            else:
                g_in, kept = (grad_output.to(hidden.dtype).clone() if grad_input else None), {}
            per_sample = {name: kept.get(name, torch.zeros_like(g)) for name, g in honest.per_sample.items()}
        else:
            other = self._alternative().backward(
                hidden, grad_output, start, end, adapter=adapter, adapter_grads=adapter_grads, grad_input=grad_input
            )
            g_in, per_sample = other.grad_input, other.per_sample
        norms = None
        if honest.squared_norms is not None:
            norms = torch.zeros_like(honest.squared_norms)
            for g in per_sample.values():
                norms += g.reshape(g.shape[0], -1).pow(2).sum(dim=1)
        return BackwardResult(grad_input=g_in, per_sample=per_sample, squared_norms=norms)

    # -- helpers -----------------------------------------------------------------------------

    def _hit(self) -> bool:
        with self._lock:
            self.calls += 1
            hit = self._rng.random() < self.spec.fraction
            self.corrupted += hit
            return hit

    def _noisy(self, out: torch.Tensor) -> torch.Tensor:
        x = out.float()
        rms = float(x.pow(2).mean().sqrt()) if x.numel() else 0.0
        with self._lock:
            noise = torch.randn(x.shape, generator=self._noise)
        return (x + noise * NOISE_SCALE * max(rms, 1e-6)).to(out.dtype)

    def _alternative(self) -> SpanBackend:
        if self._other is None:
            raise BadRequestError("this fault has no other weights")
        return self._other

    def _other_cache(self, cache: SpanCache, start: int, end: int) -> SpanCache:
        key = id(cache)
        with self._lock:
            other = self._other_caches.get(key)
            if other is None:
                other = self._alternative().new_cache(
                    start, end, batch_size=cache.batch_size, max_length=cache.max_length
                )
                self._other_caches[key] = other
                weakref.finalize(cache, self._other_caches.pop, key, None)  # freed with the session
            return other
