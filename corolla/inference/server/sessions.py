"""Admission control: concurrent calls per peer, and for inference sessions a count
limit and a KV-cache memory budget.

A session's whole cache is reserved when it opens (see `kv_cache`), so the budget is
checked once, up front, and released exactly once when the stream ends for any
reason (the client closed, vanished, or the server aborted the stream).

Every call holds one of the server's worker threads while it runs; `PeerCalls` caps
how many one peer holds at once, so one member (idle streams, a flood of forwards)
cannot take them all and the others are still served.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from corolla.inference.errors import CallLimitError, SessionLimitError


class PeerCalls:
    def __init__(self, *, max_per_peer: int) -> None:
        self.max_per_peer = max_per_peer
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, peer: str) -> Iterator[None]:
        """Hold one of `peer`'s call slots for the `with` body; `CallLimitError` if it has none left."""
        with self._lock:
            held = self._open.get(peer, 0)
            if held >= self.max_per_peer:
                raise CallLimitError(
                    f"this peer already has {held} calls open here, the most one peer may have; "
                    "finish or close some first"
                )
            self._open[peer] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._open[peer] - 1
                if left:
                    self._open[peer] = left
                else:
                    del self._open[peer]

    def held(self, peer: str) -> int:
        with self._lock:
            return self._open.get(peer, 0)


class SessionRegistry:
    def __init__(self, *, max_sessions: int, cache_budget_bytes: int) -> None:
        self.max_sessions = max_sessions
        self.cache_budget_bytes = cache_budget_bytes
        self._reserved: dict[str, int] = {}
        self._lock = threading.Lock()

    def reserve(self, session_id: str, nbytes: int) -> None:
        with self._lock:
            if session_id in self._reserved:
                raise SessionLimitError(f"session id {session_id!r} is already open on this server")
            if len(self._reserved) >= self.max_sessions:
                raise SessionLimitError(f"server is at its limit of {self.max_sessions} open sessions")
            free = self.cache_budget_bytes - sum(self._reserved.values())
            if nbytes > free:
                raise SessionLimitError(
                    f"session needs {nbytes} bytes of KV cache but only {free} of the server's "
                    f"{self.cache_budget_bytes}-byte budget are free; use a smaller max_length or batch"
                )
            self._reserved[session_id] = nbytes

    def release(self, session_id: str) -> None:
        with self._lock:
            self._reserved.pop(session_id, None)

    @property
    def open_sessions(self) -> int:
        with self._lock:
            return len(self._reserved)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self.cache_budget_bytes - sum(self._reserved.values())
