"""Keep servers supplied with the client's current adapter weights, by content hash.

Before a call that names an adapter, `ensure(stub, start, end)` puts the weights of
blocks `[start, end)` on that server unless it already has exactly these (same hash).
Weights change in place at each optimizer step; the hash is recomputed only when a
tensor's version counter moved, so a step costs one hash and one put per server.
A server that lost the adapter (restart, eviction) answers `AdapterNotFoundError`;
`call` then puts it again and retries once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from corolla.inference.client.adapter import LoraAdapter
from corolla.inference.client.transport import ServerStub
from corolla.inference.errors import AdapterNotFoundError

T = TypeVar("T")


class AdapterSync:
    def __init__(self, adapter: LoraAdapter, *, model_id: str) -> None:
        self.adapter = adapter
        self.model_id = model_id
        self._hashes: dict[tuple[int, int], tuple[tuple[int, ...], str]] = {}
        self._held: dict[str, set[str]] = {}  # endpoint -> hashes it holds (as far as we know)
        self._lock = threading.Lock()
        self.bytes_put = 0  # adapter bytes sent so far (for benchmarks)

    def digest(self, start: int, end: int) -> str:
        tensors = self.adapter.span(start, end)
        versions = tuple(t._version for t in tensors.values())
        with self._lock:
            cached = self._hashes.get((start, end))
            if cached is not None and cached[0] == versions:
                return cached[1]
        digest = self.adapter.span_hash(start, end)
        with self._lock:
            self._hashes[(start, end)] = (versions, digest)
        return digest

    def ensure(self, stub: ServerStub, start: int, end: int, *, force: bool = False) -> str:
        digest = self.digest(start, end)
        with self._lock:
            held = self._held.setdefault(stub.endpoint, set())
            if digest in held and not force:
                return digest
        tensors = self.adapter.span(start, end)
        stub.put_adapter(tensors, scaling=self.adapter.scaling, model_id=self.model_id, digest=digest)
        with self._lock:
            if len(held) > 16:  # old steps' hashes: the server evicts them too
                held.clear()
            held.add(digest)
            self.bytes_put += sum(t.numel() * t.element_size() for t in tensors.values())
        return digest

    def call(self, stub: ServerStub, start: int, end: int, fn: Callable[[str], T]) -> T:
        """`fn(adapter_hash)` with the adapter in place on `stub`'s server."""
        digest = self.ensure(stub, start, end)
        try:
            return fn(digest)
        except AdapterNotFoundError:
            return fn(self.ensure(stub, start, end, force=True))
