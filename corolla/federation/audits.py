"""Spot checks during `platform train`: sites audit the servers they train through, the
coordinator keeps the reputation ledger and tells every site whom to route around.

- Each train message carries `{"verify": {"rate": r, "quarantine": [event JSON, ...]}}`:
  the audit rate and the coordinator's quarantine events for the run's model, and with
  `--tolerances FILE` also `"tolerances": table JSON`, the coordinator's tolerance table
  (sites are other machines: the table travels, not its path; a site checks it as
  `load_table` does and refuses a malformed one). A site's `SpotChecker` starts from a
  reputation book holding those quarantines (its router drops those nodes at once) and
  audits a fraction r of its span computations (forwards and backwards) on other
  replicas, with a referee on disagreement, against that table (or the shipped one).
- The site's reply carries its audit events `{"verify": {"events": [event JSON, ...]}}`.
  Quarantines a site decides on its own stay local (it stops routing to the node for the
  rest of its round); only the coordinator's book quarantines for the consortium.
- The coordinator checks every event (pydantic, `corolla.verify.events`), requires the
  reporter to be the node id the site enrolled with (secure aggregation's keys query),
  appends it to the ledger (`--ledger`, default `<workspace>/ledger/ledger.db`), replays
  it through its book, and writes a `QuarantineEvent` when the book decides one. Its own
  held-out scoring through the swarm is audited the same way, straight into the ledger.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, RecordDict
from pydantic import ValidationError

from corolla.federation.messages import RecordError
from corolla.training.config import TrainConfig
from corolla.verify.errors import LedgerError, VerifyError
from corolla.verify.events import AuditEvent, QuarantineEvent, ReadmitEvent, Subject, canonical_json, parse_event
from corolla.verify.reputation import QuarantineDecision, ReputationBook

if TYPE_CHECKING:  # the tolerance module imports torch: not at import time (the ClientApp stays light)
    from corolla.verify.tolerance import ToleranceTable

log = logging.getLogger(__name__)

VERIFY = "verify"  # the ConfigRecord of train messages and replies
MAX_EVENTS = 10_000  # audit events one reply may carry


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


# --- site ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SiteOrders:
    """What the coordinator asks of a site's spot checks this round."""

    rate: float  # fraction of span computations to audit (0: none)
    quarantine: tuple[QuarantineEvent, ...]  # nodes to route around from the start
    tolerances: ToleranceTable | None = None  # the coordinator's tolerance table; None: the shipped one

    @classmethod
    def from_content(cls, content: RecordDict) -> SiteOrders | None:
        if VERIFY not in content:
            return None
        record = content[VERIFY]
        if not isinstance(record, ConfigRecord):
            raise RecordError(f"the {VERIFY!r} record is not a ConfigRecord")
        rate = record.get("rate")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= float(rate) <= 1:
            raise RecordError(f"verify rate {rate!r} must be a number in [0, 1]")
        events = []
        for text in _strings(record.get("quarantine", [])):
            event = _parse(text)
            if not isinstance(event, QuarantineEvent):
                raise RecordError("the verify record's quarantine list holds a non-quarantine event")
            events.append(event)
        return cls(rate=float(rate), quarantine=tuple(events), tolerances=_table(record.get("tolerances")))


class SiteAudits:
    """A site's spot checker for one round, and the events it collected."""

    def __init__(self, orders: SiteOrders, *, reporter: str) -> None:
        from corolla.verify.spot_check import SpotChecker, SpotCheckSettings

        self.book = LockedBook()
        for event in orders.quarantine:
            self.book.observe(event)
        self.events: list[AuditEvent | QuarantineEvent] = []
        self._lock = threading.Lock()
        self.checker = SpotChecker(
            self.book,
            sink=self._collect,
            reporter=reporter,
            settings=SpotCheckSettings(rate=orders.rate),
            tolerances=orders.tolerances,
        )

    def _collect(self, events: Sequence[AuditEvent | QuarantineEvent]) -> None:
        with self._lock:
            self.events.extend(events)

    def finish(self, timeout: float = 120.0) -> list[str]:
        """Wait for the audits still running; the audit events to send (canonical JSON)."""
        if not self.checker.flush(timeout):
            log.warning("spot checks still running after %.0f s: the rest are not reported", timeout)
        self.checker.close(timeout=5.0)
        with self._lock:
            audits = [e for e in self.events if isinstance(e, AuditEvent)]
        return [canonical_json(e).decode() for e in audits[:MAX_EVENTS]]


def reply_record(events: Sequence[str]) -> ConfigRecord:
    return ConfigRecord({"events": list(events)})


# --- coordinator ---------------------------------------------------------------------------


class CoordinatorAudits:
    """The coordinator's ledger and reputation book for a run, and its own spot checker."""

    def __init__(self, config: TrainConfig, *, ledger: Any, reporter: str) -> None:
        self.config = config
        self.ledger = ledger
        self.reporter = reporter
        self.tolerances: ToleranceTable | None = None  # config.tolerances, read once: the table every checker uses
        self._tolerances_json = ""  # as the sites receive it
        if config.tolerances:
            from corolla.verify.tolerance import load_table

            self.tolerances = load_table(config.tolerances)
            self._tolerances_json = self.tolerances.model_dump_json()
        self.book = LockedBook()
        self._quarantines: dict[Subject, QuarantineEvent] = {}  # the event that put each subject out
        for stored in ledger.events():  # earlier runs' verdicts still count: quarantines persist
            self.book.observe(stored.event)
            self._remember(stored.event)
        self._write_lock = threading.Lock()
        self.round_audits = 0
        self.checker: Any = None
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
        from corolla.verify.ledger import Ledger, LedgerKey
        from corolla.verify.ledger_paths import default_ledger_key_path, default_ledger_url

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

    def train_record(self) -> ConfigRecord:
        """The round's orders to every site: the audit rate, the quarantines of the model and,
        when the run has its own, the tolerance table."""
        with self._write_lock:  # every model's quarantines travel; a site's router looks at its own model's
            quarantines = [canonical_json(e).decode() for e in self._quarantines.values()]
        record = ConfigRecord({"rate": float(self.config.audit_rate), "quarantine": quarantines})
        if self._tolerances_json:
            record["tolerances"] = self._tolerances_json
        return record

    def _remember(self, event: AuditEvent | QuarantineEvent | ReadmitEvent) -> None:
        if isinstance(event, QuarantineEvent):
            self._quarantines[event.subject] = event
        elif isinstance(event, ReadmitEvent):
            self._quarantines.pop(event.subject, None)

    def check(self, content: RecordDict, *, reporter: str | None) -> list[AuditEvent]:
        """A site's audit events, checked but not yet recorded (`record` them once the site's
        upload has proved who it is). `reporter` is the node id the site enrolled with; None
        (a run without secure aggregation has no enrolment) means its reports are not taken."""
        if VERIFY not in content:
            return []
        record = content[VERIFY]
        if not isinstance(record, ConfigRecord):
            raise RecordError(f"the {VERIFY!r} record is not a ConfigRecord")
        texts = _strings(record.get("events", []))
        if len(texts) > MAX_EVENTS:
            raise RecordError(f"{len(texts)} audit events in one reply; at most {MAX_EVENTS}")
        events = []
        for text in texts:
            event = _parse(text)
            if not isinstance(event, AuditEvent):
                raise RecordError("a site may report audits only; quarantines are the coordinator's to decide")
            if reporter is not None and event.reporter != reporter:
                raise RecordError(f"an audit reported as {event.reporter!r} by the site enrolled as {reporter!r}")
            if self.book.seen(event.event_id):
                raise RecordError(f"audit event id {event.event_id} is already in the ledger")
            events.append(event)
        if reporter is None and events:
            log.warning("%d audit reports not recorded: without secure aggregation sites are not enrolled", len(events))
            return []
        return events

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

    def round_info(self) -> dict[str, Any]:
        """For the round's progress line: audits recorded since the last call, nodes quarantined."""
        with self._write_lock:
            audits, self.round_audits = self.round_audits, 0
        quarantined = sorted({s.node_id for s in self.book.quarantined()})
        return {"audits": audits, "quarantined": quarantined}

    def close(self) -> None:
        if self.checker is not None:
            self.checker.flush(60.0)
            self.checker.close()
        self.ledger.close()


def _coordinator_id(config: TrainConfig) -> str:
    if config.workspace and config.node:
        from corolla.pki import NodeIdentity

        return str(NodeIdentity.load(Path(config.workspace) / "nodes" / config.node).node_id)
    return "coordinator"


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError("the verify record's event list must be a list of strings")
    return value


def _table(value: Any) -> ToleranceTable | None:
    """The train message's tolerance table, checked as `load_table` checks a file; None when
    the message carries none (the run uses the shipped table)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"the verify record's tolerance table must be a JSON string, not {type(value).__name__}")
    from corolla.verify.tolerance import parse_table

    try:
        return parse_table(value, where="the coordinator's tolerance table")
    except VerifyError as exc:
        raise RecordError(f"refusing the train message: {exc}") from None


def _parse(text: str) -> AuditEvent | QuarantineEvent | ReadmitEvent:
    try:
        return parse_event(text)
    except ValidationError as exc:
        first = exc.errors()[0]["msg"]
        raise RecordError(f"an audit event does not parse: {exc.error_count()} errors, first: {first}") from None
