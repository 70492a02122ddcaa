"""Admission control for inference sessions: a count limit and a KV-cache memory budget.

A session's whole cache is reserved when it opens (see `kv_cache`), so the budget is
checked once, up front, and released exactly once when the stream ends for any
reason (the client closed, vanished, or the server aborted the stream).
"""

from __future__ import annotations

import threading

from corolla.inference.errors import SessionLimitError


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
