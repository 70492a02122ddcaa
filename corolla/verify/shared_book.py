"""A reputation book shared by threads: a client's (or the coordinator's) loop and its spot
checker's worker observe and ask it at once."""

from __future__ import annotations

import threading

from corolla.verify.events import AuditEvent, QuarantineEvent, ReadmitEvent, Subject
from corolla.verify.reputation import QuarantineDecision, ReputationBook

__all__ = ["LockedBook"]


class LockedBook:
    """A `ReputationBook` shared by threads (the coordinator's loop and its spot checker)."""

    def __init__(self, book: ReputationBook | None = None) -> None:
        self.book = book if book is not None else ReputationBook()
        self._lock = threading.Lock()

    def observe(self, event: AuditEvent | QuarantineEvent | ReadmitEvent) -> list[QuarantineDecision]:
        with self._lock:
            if isinstance(event, AuditEvent):
                return self.book.observe_all(event)
            self.book.observe(event)
            return []

    def observe_all(self, event: AuditEvent) -> list[QuarantineDecision]:
        return self.observe(event)

    def seen(self, event_id: str) -> bool:
        """Whether an event with this id has been observed (a resent or reused id)."""
        with self._lock:
            return self.book.seen(event_id)

    def quarantined_nodes(self, model_id: str) -> frozenset[str]:
        with self._lock:
            return self.book.quarantined_nodes(model_id)

    def audit_rate(self, subject: Subject, base_rate: float) -> float:
        with self._lock:
            return self.book.audit_rate(subject, base_rate)

    def quarantined(self) -> frozenset[Subject]:
        with self._lock:
            return frozenset(self.book.quarantined())
