"""A site's spot checks for one round: a `SpotChecker` that starts from the coordinator's
quarantines (its router drops those nodes at once), audits a fraction of the site's span
computations on other replicas with the coordinator's tolerance table (or the shipped one),
and collects the verdicts the site reports in its reply.

Quarantines a site decides on its own stay local (it stops routing to the node for the
rest of its round); only the coordinator's book quarantines for the consortium.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from corolla.federation.messages import MAX_EVENTS, AuditOrders
from corolla.verify.events import AuditEvent, QuarantineEvent
from corolla.verify.shared_book import LockedBook
from corolla.verify.spot_check import SpotChecker, SpotCheckSettings

__all__ = ["SiteAudits"]

log = logging.getLogger(__name__)


class SiteAudits:
    """A site's spot checker for one round, and the events it collected."""

    def __init__(self, orders: AuditOrders, *, reporter: str) -> None:
        self.book = LockedBook()
        for event in orders.quarantine:
            self.book.observe(event)
        self.events: list[AuditEvent | QuarantineEvent] = []
        self._lock = threading.Lock()
        settings, table = SpotCheckSettings(rate=orders.rate), orders.tolerances
        self.checker = SpotChecker(
            self.book, sink=self._collect, reporter=reporter, settings=settings, tolerances=table
        )

    def _collect(self, events: Sequence[AuditEvent | QuarantineEvent]) -> None:
        with self._lock:
            self.events.extend(events)

    def finish(self, timeout: float = 120.0) -> tuple[AuditEvent, ...]:
        """Wait for the audits still running; the audit verdicts to report (at most `MAX_EVENTS`)."""
        if not self.checker.flush(timeout):
            log.warning("spot checks still running after %.0f s: the rest are not reported", timeout)
        self.checker.close(timeout=5.0)
        with self._lock:
            audits = [e for e in self.events if isinstance(e, AuditEvent)]
        return tuple(audits[:MAX_EVENTS])
