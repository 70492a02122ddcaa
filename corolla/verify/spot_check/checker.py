"""`SpotChecker`: draws which span computations to audit, runs the audits, judges and reports.

See the package docstring for the procedure; `work.py` for what is re-run and compared.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from corolla.inference.client.adapter_sync import AdapterSync
from corolla.inference.client.routing import Hop, Router
from corolla.inference.client.swarm import Swarm
from corolla.inference.discovery import ServerRecord
from corolla.inference.errors import InferenceError
from corolla.inference.wire.backward import AdapterGrads, BackwardResult
from corolla.verify.errors import VerifyError
from corolla.verify.events import AuditEvent, Comparison, QuarantineEvent, Subject, Verdict
from corolla.verify.reputation import QuarantineDecision
from corolla.verify.spot_check.work import (
    AdapterCopy,
    Answer,
    SpanWork,
    compare_parts,
    copy_adapter,
    subject_of,
    tensor_digest,
)
from corolla.verify.tolerance import Match, Tolerance, ToleranceTable, tolerance_for

__all__ = ["ReputationSource", "SpotCheckSettings", "SpotCheckStats", "SpotChecker", "judge"]

log = logging.getLogger(__name__)

Event = AuditEvent | QuarantineEvent


class ReputationSource(Protocol):
    """What the checker needs of a `ReputationBook`."""

    def observe_all(self, event: AuditEvent) -> list[QuarantineDecision]: ...
    def quarantined_nodes(self, model_id: str) -> frozenset[str]: ...
    def audit_rate(self, subject: Subject, base_rate: float) -> float: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class SpotCheckSettings:
    rate: float = 0.05  # base fraction of span computations audited (the book may raise it per subject)
    background: bool = True  # audits run in a worker thread; False: in the caller's thread (tests)
    queue_size: int = 64  # audits waiting for the worker; a full queue drops new ones (counted)
    max_tries: int = 3  # check (and referee) servers tried in turn when one fails to answer

    def __post_init__(self) -> None:
        rate = self.rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not (math.isfinite(rate) and 0 < rate <= 1):
            raise VerifyError(f"rate={rate!r} must be a number in (0, 1] (the fraction of work audited)")
        for name in ("queue_size", "max_tries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VerifyError(f"{name}={value!r} must be an integer >= 1")


@dataclass(frozen=True, slots=True)
class SpotCheckStats:
    """Counters since the checker was made (for benchmarks and operators)."""

    sampled: int = 0  # span computations drawn for audit: audits + unchecked + dropped + errors (+ running)
    audits: int = 0  # audit events written
    passed: int = 0
    failed: int = 0
    inconclusive: int = 0
    blamed: int = 0  # audits whose check server was blamed (the referee sided with the primary)
    quarantines: int = 0  # quarantine events written
    unchecked: int = 0  # drawn, but no other node could re-run it (or the adapter moved on)
    dropped: int = 0  # drawn, but the worker's queue was full (or the checker closed)
    errors: int = 0  # audits abandoned on an unexpected error (logged)


def judge(
    versus_check: Comparison, referee_vs_primary: Comparison | None, referee_vs_check: Comparison | None
) -> tuple[Verdict, bool]:
    """The verdict on the subject, and whether the check server is blamed: PASS when primary and
    check agree; otherwise FAIL when the referee agrees with the check and not the primary,
    PASS with the check blamed in the opposite case, INCONCLUSIVE without a referee or when
    it agrees with both or neither."""
    if versus_check.agree:
        return Verdict.PASS, False
    if referee_vs_primary is None or referee_vs_check is None:
        return Verdict.INCONCLUSIVE, False
    if referee_vs_check.agree and not referee_vs_primary.agree:
        return Verdict.FAIL, False
    if referee_vs_primary.agree and not referee_vs_check.agree:
        return Verdict.PASS, True
    return Verdict.INCONCLUSIVE, False


class SpotChecker:
    """Audits a sample of span computations; thread-safe. See the package docstring."""

    def __init__(
        self,
        book: ReputationSource,
        *,
        sink: Callable[[list[Event]], None],
        reporter: str,
        settings: SpotCheckSettings | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        tolerances: ToleranceTable | None = None,
    ) -> None:
        """`sink` receives each audit's events (the ledger's append, or a buffer a training site
        sends to the coordinator); `reporter` is this node's id. `rng` draws which work is audited
        and where (a CSPRNG by default, so no server can predict it); `tolerances` replaces the
        shipped table (a calibration for another model)."""
        if not reporter:
            raise VerifyError("reporter must name the node running the checks")
        self.book = book
        self.sink = sink
        self.reporter = reporter
        self.settings = settings if settings is not None else SpotCheckSettings()
        self._rng = rng if rng is not None else random.SystemRandom()
        self._clock = clock
        self._tolerances = tolerances
        self._fallback_models: set[str] = set()  # models warned about (no calibrated entry)
        self._book_lock = threading.Lock()  # the book is plain bookkeeping: one caller at a time
        self._lock = threading.Lock()  # counters, listeners, the RNG, closing
        self._counts = dict.fromkeys((f.name for f in fields(SpotCheckStats)), 0)
        self._listeners: list[Callable[[], None]] = []
        self._queue: queue.Queue[SpanWork | None] = queue.Queue(maxsize=self.settings.queue_size)
        self._idle = threading.Condition()
        self._pending = 0  # audits queued or running
        self._closed = False
        self._worker: threading.Thread | None = None
        if self.settings.background:
            self._worker = threading.Thread(target=self._work, name="corolla-spot-check", daemon=True)
            self._worker.start()

    # -- wiring ------------------------------------------------------------------------------

    def attach(self, router: Router) -> None:
        """Keep the nodes the book quarantines out of `router`: dropped at each fetch, and the
        fetched records invalidated the moment this checker quarantines one."""
        router.exclude = self.excludes
        with self._lock:
            self._listeners.append(router.invalidate)
        router.invalidate()

    def excludes(self, record: ServerRecord) -> bool:
        """True for a record of a node quarantined for its model."""
        with self._book_lock:
            return record.node_id in self.book.quarantined_nodes(record.model_id)

    def stats(self) -> SpotCheckStats:
        with self._lock:
            return SpotCheckStats(**self._counts)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued audit has run; False if `timeout` seconds passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Run what is queued, then stop the worker; later audits are dropped (counted)."""
        with self._lock:
            self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout)

    # -- hooks the client calls after each span computation ------------------------------------

    def forward_done(
        self,
        swarm: Swarm,
        hop: Hop,
        hidden: torch.Tensor,
        output: torch.Tensor,
        *,
        wire_dtype: torch.dtype | None = None,
        adapter: AdapterSync | None = None,
        adapter_digest: str = "",
    ) -> None:
        """A parallel forward of `hidden` (B, T, H) through `hop` returned `output`."""
        self._maybe_submit(
            swarm,
            hop,
            adapter,
            adapter_digest,
            lambda subject, copy: SpanWork.forward(swarm, hop, subject, copy, hidden, output, wire_dtype),
        )

    def step_done(
        self,
        swarm: Swarm,
        hop: Hop,
        history: Sequence[torch.Tensor],
        hidden: torch.Tensor,
        output: torch.Tensor,
        *,
        wire_dtype: torch.dtype | None = None,
        adapter: AdapterSync | None = None,
        adapter_digest: str = "",
    ) -> None:
        """An inference step of `hidden` (B, T, H) at position P = the tokens in `history` (the
        hop's earlier inputs, in order) returned `output`."""
        self._maybe_submit(
            swarm,
            hop,
            adapter,
            adapter_digest,
            lambda subject, copy: SpanWork.step(swarm, hop, subject, copy, history, hidden, output, wire_dtype),
        )

    def backward_done(
        self,
        swarm: Swarm,
        hop: Hop,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        result: BackwardResult,
        *,
        mode: AdapterGrads,
        grad_input: bool,
        adapter: AdapterSync | None = None,
        adapter_digest: str = "",
    ) -> None:
        """A backward through `hop` of input `hidden` and output gradient `grad_output` (both
        (B, T, H)), asking for `mode` adapter gradients, returned `result`."""
        self._maybe_submit(
            swarm,
            hop,
            adapter,
            adapter_digest,
            lambda subject, copy: SpanWork.backward(
                swarm, hop, subject, copy, hidden, grad_output, result, mode, grad_input
            ),
        )

    # -- sampling and queueing -----------------------------------------------------------------

    def _maybe_submit(
        self,
        swarm: Swarm,
        hop: Hop,
        adapter: AdapterSync | None,
        adapter_digest: str,
        make: Callable[[Subject, AdapterCopy | None], SpanWork],
    ) -> None:
        """Draw whether to audit; if so, copy what the audit needs and queue it. Never raises:
        the primary's answer is the caller's, whatever happens to its audit."""
        try:
            subject = subject_of(swarm, hop.record)
            with self._book_lock:
                rate = min(1.0, max(0.0, self.book.audit_rate(subject, self.settings.rate)))
            with self._lock:
                if self._rng.random() >= rate:
                    return
                self._counts["sampled"] += 1
            copy = None
            if adapter is not None and adapter_digest:
                copy = copy_adapter(adapter, hop)
                if copy.digest != adapter_digest:  # the weights moved since the call: not the same work
                    self._count("unchecked")
                    return
            work = make(subject, copy)
        except Exception:
            log.exception("spot check: preparing an audit failed")
            self._count("errors")
            return
        if self._worker is None:
            self._run(work)
            return
        with self._idle:
            self._pending += 1
        with self._lock:  # atomic with close(): nothing is queued behind the worker's stop
            accepted = not self._closed
            if accepted:
                try:
                    self._queue.put_nowait(work)
                except queue.Full:
                    accepted = False
        if not accepted:
            self._done()
            self._count("dropped")

    def _work(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            try:
                self._run(work)
            finally:
                self._done()

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    # -- one audit -----------------------------------------------------------------------------

    def _run(self, work: SpanWork) -> None:
        try:
            events = self._audit(work)
        except Exception:
            log.exception("spot check of %s blocks %d:%d failed", work.hop.endpoint, work.hop.start, work.hop.end)
            self._count("errors")
            return
        if not events:
            return
        try:
            self.sink(events)
        except Exception:
            log.exception("spot check: the sink refused %d event(s)", len(events))
            self._count("errors")

    def _audit(self, work: SpanWork) -> list[Event]:
        primary = Answer(work.hop.record, work.primary)
        check = self._answer(work, exclude={primary.record.node_id})
        if check is None:
            self._count("unchecked")
            return []
        tolerance = self._tolerance(primary, check, work)
        versus_check = compare_parts(primary.parts, check.parts, tolerance)
        referee = referee_vs_primary = referee_vs_check = None
        if not versus_check.agree:
            referee = self._answer(work, exclude={primary.record.node_id, check.record.node_id})
            if referee is not None:
                referee_vs_primary = compare_parts(
                    primary.parts, referee.parts, self._tolerance(primary, referee, work)
                )
                referee_vs_check = compare_parts(check.parts, referee.parts, self._tolerance(check, referee, work))
        verdict, check_blamed = judge(versus_check, referee_vs_primary, referee_vs_check)
        blamed = subject_of(work.swarm, check.record) if check_blamed else None
        event = AuditEvent(
            event_id=uuid.uuid4().hex,
            at=self._clock(),
            reporter=self.reporter,
            subject=work.subject,
            work=work.work,
            input_sha256=tensor_digest(work.inputs),
            primary=primary.run(),
            check=check.run(),
            comparison=versus_check,
            tolerance_rel_l2=tolerance.rel_l2,
            tolerance_max_abs=tolerance.max_abs,
            referee=None if referee is None else referee.run(),
            referee_vs_primary=referee_vs_primary,
            referee_vs_check=referee_vs_check,
            verdict=verdict,
            blamed=blamed,
        )
        with self._book_lock:
            decisions = self.book.observe_all(event)
        events: list[Event] = [event]
        events.extend(d.event(event_id=uuid.uuid4().hex, at=self._clock(), reporter=self.reporter) for d in decisions)
        with self._lock:
            self._counts["audits"] += 1
            self._counts[{Verdict.PASS: "passed", Verdict.FAIL: "failed"}.get(verdict, "inconclusive")] += 1
            self._counts["blamed"] += blamed is not None
            self._counts["quarantines"] += len(decisions)
            listeners = list(self._listeners) if decisions else []
        for d in decisions:
            s = d.subject
            log.warning("spot check: node %s quarantined for %s blocks %d:%d", s.node_id, s.model_id, s.start, s.end)
        for listener in listeners:
            listener()
        return events

    def _answer(self, work: SpanWork, *, exclude: set[str]) -> Answer | None:
        """The work re-run on a random other node covering the hop; None if none could."""
        hop, model_id = work.hop, work.swarm.model_id
        quarantined = self._quarantined(model_id)
        candidates: dict[str, ServerRecord] = {}  # one per node: two endpoints of a node are one server
        for record in work.swarm.router.records():
            if (
                record.model_id == model_id
                and record.start <= hop.start
                and hop.end <= record.end
                and record.node_id not in exclude
                and record.node_id not in quarantined
            ):
                candidates.setdefault(record.node_id, record)
        order = list(candidates.values())
        with self._lock:
            self._rng.shuffle(order)
        for record in order[: self.settings.max_tries]:
            try:
                return Answer(record, work.rerun(work.swarm.stub(record.endpoint)))
            except InferenceError as exc:
                log.info("spot check: %s could not re-run blocks %d:%d: %s", record.endpoint, hop.start, hop.end, exc)
        return None

    def _tolerance(self, a: Answer, b: Answer, work: SpanWork) -> Tolerance:
        """The table's bound for the pair, for the work's model (by weight fingerprint, else by
        hidden size, else the documented fallback: see `corolla.verify.tolerance`)."""
        model_id, hidden_size = work.swarm.model_id, int(work.hidden.shape[-1])
        tolerance = tolerance_for(
            a.precision, b.precision, work.work, table=self._tolerances, model_id=model_id, hidden_size=hidden_size
        )
        if tolerance.match == Match.FALLBACK:
            with self._lock:
                first = model_id not in self._fallback_models
                self._fallback_models.add(model_id)
            if first:
                log.warning(
                    "spot check: the tolerance table has no entry for model %s (hidden size %d) and pair %s/%s; "
                    "auditing it against the fallback bounds (calibrate it: platform audit calibrate --model DIR)",
                    model_id,
                    hidden_size,
                    a.precision,
                    b.precision,
                )
        return tolerance

    def _quarantined(self, model_id: str) -> frozenset[str]:
        with self._book_lock:
            return self.book.quarantined_nodes(model_id)
