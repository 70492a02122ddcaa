"""The coordinator's spot checks during `platform train`: the reputation ledger, the orders
every train message carries, and the sites' verdicts.

- Each train message carries `AuditOrders`: the audit rate, the coordinator's quarantine
  events (every model's: a site's router looks at its own model's), the ledger's signed
  head as a witness (sites keep the newest they have seen, so a ledger rolled back to an
  older copy is caught: by the sites at once, and by `platform audit verify --witness`)
  and, with `--tolerances FILE`, the coordinator's tolerance table (sites are other
  machines: the table travels, not its path).
- A site's reply carries its audit verdicts. The coordinator checks every one (only audits,
  never quarantines; reported by the node id the site enrolled with; an event id not seen
  before), appends it to the ledger (`--ledger`, default `<workspace>/ledger/ledger.db`)
  once the site's upload has proved who sent it, replays it through its book, and writes a
  `QuarantineEvent` when the book decides one. Its own held-out scoring through the swarm is
  audited the same way, straight into the ledger.

What the coordinator cannot check: that a site's audit report is true (it would have to
re-run the work). Sites are authenticated consortium members; a site that lies about
audits is a member misbehaving (docs/verification.md, threat model).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from corolla.federation.messages import AuditOrders, RecordError
from corolla.federation.outcomes import AuditInfo
from corolla.pki import NodeIdentity
from corolla.training.config import TrainConfig
from corolla.verify.errors import LedgerError
from corolla.verify.events import AuditEvent, QuarantineEvent, ReadmitEvent, Subject
from corolla.verify.ledger import Ledger, LedgerKey
from corolla.verify.ledger_paths import default_ledger_key_path, default_ledger_url
from corolla.verify.shared_book import LockedBook

if TYPE_CHECKING:  # the tolerance module and the spot checker import torch: only in a run that audits
    from corolla.verify.spot_check import SpotChecker
    from corolla.verify.tolerance import ToleranceTable

__all__ = ["CoordinatorAudits"]

log = logging.getLogger(__name__)

Event = AuditEvent | QuarantineEvent | ReadmitEvent


class CoordinatorAudits:
    """The coordinator's ledger and reputation book for a run, and its own spot checker."""

    def __init__(self, config: TrainConfig, *, ledger: Ledger, reporter: str) -> None:
        self.config = config
        self.ledger = ledger
        self.reporter = reporter
        self.tolerances: ToleranceTable | None = None  # config.tolerances, read once: the table every checker uses
        if config.tolerances:
            from corolla.verify.tolerance import load_table

            self.tolerances = load_table(config.tolerances)
        self.book = LockedBook()
        self._quarantines: dict[Subject, QuarantineEvent] = {}  # the event that put each subject out
        for stored in ledger.events():  # earlier runs' verdicts still count: quarantines persist
            self.book.observe(stored.event)
            self._remember(stored.event)
        self._write_lock = threading.Lock()
        self.round_audits = 0
        self.checker: SpotChecker | None = None
        if config.audit_rate > 0:
            from corolla.verify.spot_check import SpotChecker, SpotCheckSettings

            self.checker = SpotChecker(
                self.book,
                sink=self._own_events,
                reporter=reporter,
                settings=SpotCheckSettings(rate=config.audit_rate),
                tolerances=self.tolerances,
            )

    @classmethod
    def for_config(cls, config: TrainConfig) -> CoordinatorAudits | None:
        """None when the run audits nothing (`--audit-rate 0`)."""
        if config.audit_rate <= 0:
            return None
        workspace = Path(config.workspace) if config.workspace else Path(config.out_dir)
        url = config.ledger or default_ledger_url(workspace)
        key_path = Path(config.ledger_key) if config.ledger_key else default_ledger_key_path(workspace)
        reporter = _coordinator_id(config)
        ledger = Ledger.open(url, key=LedgerKey.load_or_create(key_path), writer=reporter)
        try:
            return cls(config, ledger=ledger, reporter=reporter)
        except BaseException:  # e.g. a tolerance table that no longer loads
            ledger.close()
            raise

    def orders(self) -> AuditOrders:
        """The round's orders to every site: the audit rate, the quarantines, the ledger's
        signed head (the witness) and, when the run has its own, the tolerance table."""
        with self._write_lock:  # the head and the quarantines of one state of the ledger
            quarantines = tuple(self._quarantines.values())
            witness = self.ledger.witness()
        return AuditOrders(
            rate=float(self.config.audit_rate), quarantine=quarantines, tolerances=self.tolerances, witness=witness
        )

    def _remember(self, event: Event) -> None:
        if isinstance(event, QuarantineEvent):
            self._quarantines[event.subject] = event
        elif isinstance(event, ReadmitEvent):
            self._quarantines.pop(event.subject, None)

    def check(self, events: Sequence[Event] | None, *, reporter: str | None) -> list[AuditEvent]:
        """A site's audit verdicts, checked but not yet recorded (`record` them once the site's
        upload has proved who it is). `reporter` is the node id the site enrolled with; None
        (a run without secure aggregation has no enrolment) means its reports are not taken."""
        audits = []
        for event in events or ():
            if not isinstance(event, AuditEvent):
                raise RecordError("a site may report audits only; quarantines are the coordinator's to decide")
            if reporter is not None and event.reporter != reporter:
                raise RecordError(f"an audit reported as {event.reporter!r} by the site enrolled as {reporter!r}")
            if self.book.seen(event.event_id):
                raise RecordError(f"audit event id {event.event_id} is already in the ledger")
            audits.append(event)
        if reporter is None and audits:
            log.warning("%d audit reports not recorded: without secure aggregation sites are not enrolled", len(audits))
            return []
        return audits

    def record(self, events: Sequence[AuditEvent]) -> int:
        """Write checked audit events to the ledger and replay them; how many were recorded."""
        try:
            return self._write(events)
        except LedgerError as exc:  # e.g. an event id reused with other content: the site's fault
            raise RecordError(f"audit report refused by the ledger: {exc}") from None

    def _own_events(self, events: Sequence[AuditEvent | QuarantineEvent]) -> None:
        # The checker has already shown these to the book (it shares it): only record them.
        with self._write_lock:
            self.ledger.append(list(events))
            self.round_audits += sum(isinstance(e, AuditEvent) for e in events)
            for event in events:
                self._remember(event)

    def _write(self, events: Iterable[AuditEvent]) -> int:
        written = 0
        with self._write_lock:
            for event in events:
                if self.book.seen(event.event_id):
                    continue
                decisions = self.book.observe(event)
                quarantines = [
                    d.event(event_id=uuid.uuid4().hex, at=time.time(), reporter=self.reporter) for d in decisions
                ]
                self.ledger.append([event, *quarantines])
                self.round_audits += 1
                written += 1
                for q in quarantines:
                    self._remember(q)
                    log.warning(
                        "quarantined %s (blocks %d:%d of %s): %s",
                        q.subject.node_id,
                        q.subject.start,
                        q.subject.end,
                        q.subject.model_id,
                        q.reason,
                    )
        return written

    def round_info(self) -> AuditInfo:
        """For the round's progress line: audits recorded since the last call, nodes quarantined."""
        with self._write_lock:
            audits, self.round_audits = self.round_audits, 0
        quarantined = sorted({s.node_id for s in self.book.quarantined()})
        return AuditInfo(audits=audits, quarantined=quarantined)

    def close(self) -> None:
        if self.checker is not None:
            self.checker.flush(60.0)
            self.checker.close()
        self.ledger.close()


def _coordinator_id(config: TrainConfig) -> str:
    if config.workspace and config.node:
        return str(NodeIdentity.load(Path(config.workspace) / "nodes" / config.node).node_id)
    return "coordinator"
