"""What a server keeps for training clients: their adapters, and per-sample gradients
waiting for their clip factors (flat clipping).

Adapters are content-addressed: a client puts one once per optimizer step and names it
by hash in its forward, backward and session requests. Both stores are bounded in
bytes, evict the oldest entry first, and are safe to use from the gRPC worker threads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import torch

from corolla.inference.errors import (
    AdapterNotFoundError,
    BadRequestError,
    MessageTooLargeError,
    SessionLimitError,
    SpanNotServedError,
    StepNotFoundError,
)
from corolla.inference.models.lora import SpanAdapter
from corolla.inference.models.span import Span
from corolla.inference.wire.adapters import parse_name

MAX_RANK = 1024  # largest LoRA rank accepted
V = TypeVar("V")


def check_adapter(span: Span, scaling: float, tensors: Mapping[str, torch.Tensor]) -> SpanAdapter:
    """The adapter as the blocks apply it, after checking every name and shape against `span`."""
    allowed = set(span.family.lora_modules())
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        key = parse_name(name)
        if not span.start <= key.block < span.end:
            raise SpanNotServedError(f"adapter tensor {name!r}: block {key.block} is not in {span.start}:{span.end}")
        if key.module not in allowed:
            raise BadRequestError(
                f"adapter tensor {name!r}: {key.module!r} cannot carry LoRA; allowed: {', '.join(sorted(allowed))}"
            )
        halves.setdefault((key.block, key.module), {})[key.part] = tensor
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (block, module), parts in halves.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise BadRequestError(f"adapter: {block}.{module} needs both lora_A and lora_B")
        layer: Any = span.blocks[block - span.start].get_submodule(module)  # nn.Linear or a bitsandbytes layer
        in_features, out_features = int(layer.in_features), int(layer.out_features)
        a, b = parts["lora_A"].float(), parts["lora_B"].float()  # on the cpu, as they came off the wire
        rank = a.shape[0]
        if not 1 <= rank <= MAX_RANK or a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise BadRequestError(
                f"adapter: {block}.{module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected "
                f"(r, {in_features}) and ({out_features}, r) with 1 <= r <= {MAX_RANK}"
            )
        pairs[(block, module)] = (a.to(span.device), b.to(span.device))  # kept where the blocks compute
    return SpanAdapter.from_pairs(pairs, scaling)


class _BoundedStore(Generic[V]):
    """Oldest-first eviction under a byte budget; entries older than `ttl` seconds vanish."""

    def __init__(self, *, budget_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_bytes = budget_bytes
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[str, tuple[V, int, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    evict = True  # False: a full store refuses new entries instead of dropping live ones

    def _put(self, key: str, value: V, nbytes: int) -> None:
        if nbytes > self.budget_bytes:
            raise MessageTooLargeError(f"{nbytes} bytes exceed this server's budget of {self.budget_bytes} for them")
        with self._lock:
            self._drop(key)
            self._expire()
            if not self.evict and self._bytes + nbytes > self.budget_bytes:
                raise SessionLimitError(
                    f"{self._bytes} of {self.budget_bytes} bytes are held for other clients' steps; try again shortly"
                )
            self._items[key] = (value, nbytes, self._clock())
            self._bytes += nbytes
            while self._bytes > self.budget_bytes:
                self._drop(next(iter(self._items)))

    def _get(self, key: str, *, pop: bool) -> V | None:
        with self._lock:
            self._expire()
            item = self._items.get(key)
            if item is None:
                return None
            if pop:
                self._drop(key)
            else:  # used now: last in the eviction order, and its lifetime starts again
                self._items[key] = (item[0], item[1], self._clock())
                self._items.move_to_end(key)
            return item[0]

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]

    def _expire(self) -> None:
        now = self._clock()
        while self._items:
            key, (_, _, born) = next(iter(self._items.items()))
            if now - born <= self.ttl:
                break
            self._drop(key)

    def __len__(self) -> int:
        return len(self._items)


class AdapterStore(_BoundedStore[SpanAdapter]):
    def put(self, digest: str, adapter: SpanAdapter) -> None:
        nbytes = sum(a.nbytes + b.nbytes for block in adapter.blocks.values() for a, b in block.pairs.values())
        self._put(digest, adapter, nbytes)

    def get(self, digest: str) -> SpanAdapter:
        adapter = self._get(digest, pop=False)
        if adapter is None:
            raise AdapterNotFoundError(f"adapter {digest[:16]}... is not held here; put it again")
        return adapter


class GradStore(_BoundedStore[tuple[int, dict[str, torch.Tensor]]]):
    """Per-sample gradients of a NORMS backward (and its batch size), until ClipSum asks
    for their clipped sum. A full store refuses new steps rather than dropping pending ones."""

    evict = False

    def put(self, step_id: str, batch: int, grads: dict[str, torch.Tensor]) -> None:
        if not step_id or len(step_id) > 128:
            raise BadRequestError("step_id must be 1 to 128 characters")
        self._put(step_id, (batch, grads), sum(g.nbytes for g in grads.values()))

    def peek(self, step_id: str) -> tuple[int, dict[str, torch.Tensor]]:
        grads = self._get(step_id, pop=False)
        if grads is None:
            raise StepNotFoundError(f"no per-sample gradients are held for step {step_id!r} (expired or used)")
        return grads

    def pop(self, step_id: str) -> tuple[int, dict[str, torch.Tensor]]:
        grads = self._get(step_id, pop=True)
        if grads is None:
            raise StepNotFoundError(f"no per-sample gradients are held for step {step_id!r} (expired or used)")
        return grads
