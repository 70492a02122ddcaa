"""The coordinator's loop over Flower rounds, independent of the model being trained: the
one loop of every run (the federated run on Flower's Grid, `--in-process` on `InProcessGrid`).

Each round: sample every online SuperNode, send it the current weights, wait for the
replies, add the mean of the updates that came back, evaluate, log. A site that refuses
(e.g. its privacy budget is spent), fails, or does not answer is recorded and the round
goes on with the others; a round with no update keeps the weights and says so. A secure
round lost after the uploads (too few survivors to unmask, or unmasking failed) records
every site that uploaded as `not_aggregated`, not `ok`: it trained, and spent privacy
budget on it, but its update is in no aggregate (the summary counts such rounds in
`rounds_not_aggregated`, not in `rounds_trained`).

How flwr 1.42 reports a site that is gone (read from its source and checked end to end by
`tests/federation/test_flower_rounds_e2e.py`):

- `Grid.send_and_receive(messages, timeout=T)` pushes, then pulls every 3 s until every
  message has a reply or T passes; it returns only what arrived.
- A SuperNode heartbeats every 17.5-22.5 s (interval 30 s minus 5 s, times 0.7-0.9); the
  SuperLink keeps it online until 2 x 30 s after the last one (`HEARTBEAT_PATIENCE`).
  While pulling, the SuperLink answers a message whose destination is offline with an error
  reply, code 5 `NODE_UNAVAILABLE`, from node 0 with `reply_to_message_id` set. So a
  SuperNode killed mid-round (SIGKILL) is reported 37.5-60 s after its last heartbeat, and
  the round ends then instead of at T. A SuperNode stopped cleanly deactivates itself and
  is reported at the next pull. Either is recorded here as `offline`.
- A node that is online but never replies (a ClientApp stuck) is recorded as `missing`
  when T passes; so is a message the SuperLink reports expired (codes 3 and 4). Messages
  are sent with TTL = T, so a node that comes back late does not train a stale round.
- An exception in a ClientApp reaches us as code 2 with Flower's text; our ClientApp
  replies with its own codes instead (`messages.SITE_REFUSED` etc.).
- `Grid.get_node_ids()` lists the nodes the SuperLink holds online now (same heartbeat rule).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import Message, MessageType

from corolla.errors import CorollaError
from corolla.federation.coordinator.mean import mean_update
from corolla.federation.coordinator.secure import SecureRound, SecureRounds
from corolla.federation.grid import Exchange
from corolla.federation.messages import (
    AuditOrders,
    RecordError,
    TrainOrder,
    TrainReply,
    Weights,
    from_array_record,
    read_error,
    to_array_record,
)
from corolla.federation.outcomes import (
    AuditInfo,
    AuditSummary,
    BaselineEvent,
    DoneEvent,
    EvalEvent,
    RoundEvent,
    RoundStartEvent,
    RunSummary,
    Scores,
    SecureAggInfo,
    SiteEvent,
    SiteOutcome,
    SiteRound,
    SiteSummary,
    StartEvent,
    Status,
)
from corolla.federation.progress import ProgressLog
from corolla.secure_agg import SecureAggregationError
from corolla.training.config import TrainConfig
from corolla.verify.events import AuditEvent, QuarantineEvent, ReadmitEvent

__all__ = ["AuditsLike", "CoordinatorLike", "RoundError", "mean_update", "run_rounds"]

_log = logging.getLogger(__name__)

Aggregate = Callable[[list[Weights]], Weights]
EvalProgress = Callable[[int, int], None]  # (records scored, records in all)
NODE_POLL = 1.0  # seconds between looks at the online nodes while waiting for sites


class RoundError(CorollaError):
    """The coordinator's loop cannot go on (e.g. an aggregate of the wrong shape)."""


class CoordinatorLike(Protocol):
    """What the loop needs from the model side (`coordinator.model.Coordinator`, or the local one)."""

    def initial_weights(self) -> Mapping[str, np.ndarray]: ...

    def evaluate(self, weights: Weights, progress: EvalProgress | None = None) -> Mapping[str, float]:
        """Held-out scores; `progress(done, total)` after each batch of records scored."""
        ...

    def save(self, weights: Weights, summary: RunSummary) -> Path: ...


class AuditsLike(Protocol):
    """What the loop needs from the coordinator's spot checks (`coordinator.audits`)."""

    def orders(self) -> AuditOrders: ...

    def check(
        self, events: Sequence[AuditEvent | QuarantineEvent | ReadmitEvent] | None, *, reporter: str | None
    ) -> list[AuditEvent]: ...

    def record(self, events: Sequence[AuditEvent]) -> int: ...

    def round_info(self) -> AuditInfo: ...


def run_rounds(
    grid: Exchange,
    config: TrainConfig,
    coordinator: CoordinatorLike,
    *,
    progress: ProgressLog,
    secure: SecureRounds | None = None,
    audits: AuditsLike | None = None,
    aggregate: Aggregate = mean_update,
    mode: str = "federated",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RunSummary:
    """Run `config.rounds` rounds; save through `coordinator.save` and return the summary
    (its `adapter` is the directory `save` returned).

    With `secure` (required when `config.secure_agg`), the sites' updates are combined by
    secure aggregation and the coordinator sees only their mean; otherwise by `aggregate`
    over the updates in the clear. With `audits`, every train message carries the spot-check
    orders and the sites' audit reports go to the coordinator's ledger."""
    if config.secure_agg and secure is None:
        raise RoundError("the run asks for secure aggregation, but the coordinator was given no keys for it")
    weights = _checked_weights(coordinator.initial_weights())
    state = _RunState()
    plain_name = getattr(aggregate, "__name__", type(aggregate).__name__)
    aggregation = "secure_aggregation" if secure is not None else plain_name
    progress.emit(
        StartEvent(
            rounds=config.rounds,
            dp=config.dp,
            dp_epsilon=config.dp_epsilon,
            secure_agg=secure is not None,
            aggregation=aggregation,
            sites_expected=config.sites,
        )
    )
    started = clock()
    initial = _scores(coordinator.evaluate(weights, _eval_progress(progress, 0, config.rounds, clock)))
    progress.emit(BaselineEvent(rounds=config.rounds, seconds=round(clock() - started, 3), eval=initial, dp=config.dp))
    evaluation: Scores = {}
    for server_round in range(1, config.rounds + 1):
        started = clock()
        want = config.sites if server_round == 1 else 1
        nodes = _wait_for_nodes(grid, want=want, timeout=config.round_timeout, clock=clock, sleep=sleep)
        progress.emit(RoundStartEvent(round=server_round, rounds=config.rounds, nodes=len(nodes)))
        this = _Round(
            grid=grid,
            weights=weights,
            server_round=server_round,
            timeout=config.round_timeout,
            state=state,
            audits=audits,
        )
        result = _train_round(this, nodes, secure, aggregate)
        kept = result.delta is None
        if result.delta is not None:
            _check_aggregate(result.delta, weights)
            new = {name: (weights[name] + result.delta[name]).astype(np.float32) for name in weights}
            if all(np.all(np.isfinite(w)) for w in new.values()):
                weights = new
            else:  # finite updates can still overflow float32 weights (a site sending huge values)
                _log.warning("round %d: the aggregate makes the weights non-finite; they are unchanged", server_round)
                kept = True
        else:
            _log.warning("round %d: no update to aggregate; the weights are unchanged", server_round)
        evaluation = _scores(
            coordinator.evaluate(weights, _eval_progress(progress, server_round, config.rounds, clock))
        )
        record = RoundEvent(
            round=server_round,
            rounds=config.rounds,
            seconds=round(clock() - started, 3),
            nodes=len(nodes),
            aggregated=result.aggregated,
            kept=kept,
            eval=evaluation,
            dp=config.dp,
            sites={state.name(node): outcome for node, outcome in result.outcomes.items()},
            secure_agg=result.secure,
            verify=audits.round_info() if audits is not None else None,
        )
        progress.emit(record)
        state.record_round(record, result.outcomes)
    summary = state.summary(config, evaluation, initial, aggregation, mode=mode, audited=audits is not None)
    adapter = coordinator.save(weights, summary)
    summary = summary.model_copy(update={"adapter": str(adapter)})
    progress.emit(DoneEvent(adapter=str(adapter), summary=str(Path(config.out_dir) / "summary.json")))
    return summary


def _eval_progress(progress: ProgressLog, server_round: int, rounds: int, clock: Callable[[], float]) -> EvalProgress:
    """The callback an evaluation reports to: an `eval` event per batch scored."""
    started = clock()

    def report(done: int, total: int) -> None:
        seconds = round(clock() - started, 3)
        progress.emit(EvalEvent(round=server_round, rounds=rounds, done=done, total=total, seconds=seconds))

    return report


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Round:
    """One round as the loop runs it: where the messages go, what they carry, what is recorded."""

    grid: Exchange
    weights: Weights  # the round's starting weights
    server_round: int
    timeout: float  # seconds to wait for the round's replies (also the messages' TTL)
    state: _RunState
    audits: AuditsLike | None


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _RoundResult:
    delta: Weights | None  # the mean update, None when there is none
    aggregated: int  # how many sites it averages
    outcomes: dict[int, SiteOutcome]  # each node's outcome, in node order
    secure: SecureAggInfo | None = None  # what secure aggregation reports; None when it is off


def _train_round(this: _Round, nodes: list[int], secure: SecureRounds | None, aggregate: Aggregate) -> _RoundResult:
    if secure is None:
        plain = _PlainRound(this.weights)
        outcomes = _exchange(this, nodes, plain, {})
        delta = aggregate(plain.updates) if plain.updates else None
        return _RoundResult(delta=delta, aggregated=len(plain.updates), outcomes=outcomes)

    grid, weights, server_round, timeout = this.grid, this.weights, this.server_round, this.timeout
    pruned = secure.prune(nodes)  # a node whose certificate no longer holds sits the round out
    failed = {**pruned, **secure.enroll(grid, [node for node in nodes if node not in pruned], timeout)}
    members = [node for node in nodes if node in secure.members]
    try:
        secure_round = secure.round(members, server_round, weights)
    except SecureAggregationError as exc:  # e.g. fewer than 2 sites with keys
        _log.warning("round %d: no secure aggregation possible: %s", server_round, exc)
        skipped = SiteOutcome.absent(Status.SKIPPED, str(exc))
        return _RoundResult(
            delta=None,
            aggregated=0,
            outcomes={node: failed.get(node, skipped) for node in nodes},
            secure=SecureAggInfo(error=f"{type(exc).__name__}: {exc}"),
        )
    reporters = {node: secure.members[node].node_id for node in members}  # audits must come from these ids
    rnd = _SecureExchange(secure_round)
    exchanged = _exchange(this, members, rnd, reporters)
    outcomes = {node: failed[node] if node in failed else exchanged[node] for node in nodes}
    if not secure_round.uploads:
        info = SecureAggInfo(uploads=0, threshold=secure_round.aggregator.threshold)
        return _RoundResult(delta=None, aggregated=0, outcomes=outcomes, secure=info)
    try:
        delta, info = secure_round.finish(grid, timeout)
    except SecureAggregationError as exc:  # too few survivors, a sum out of range: the round is lost
        _log.warning("round %d: secure aggregation failed: %s", server_round, exc)
        error = f"{type(exc).__name__}: {exc}"
        info = SecureAggInfo(uploads=secure_round.uploads, error=error)
        return _RoundResult(delta=None, aggregated=0, outcomes=_not_aggregated(outcomes, error), secure=info)
    return _RoundResult(delta=delta, aggregated=info.survivors or 0, outcomes=outcomes, secure=info)


def _not_aggregated(outcomes: Mapping[int, SiteOutcome], error: str) -> dict[int, SiteOutcome]:
    """The outcomes of a secure round lost after the uploads: every site whose upload was
    accepted trained, but its update is in no aggregate. Its metrics stay as it reported them
    (its epsilon included: the round's privacy cost was charged before training)."""
    reason = (
        f"trained, but its update was not aggregated: secure aggregation failed ({error}); "
        "any privacy budget it spent on the round stays spent"
    )
    return {
        node: outcome.model_copy(update={"status": Status.NOT_AGGREGATED, "reason": reason})
        if outcome.status == Status.OK
        else outcome
        for node, outcome in outcomes.items()
    }


def _wait_for_nodes(
    grid: Exchange, *, want: int, timeout: float, clock: Callable[[], float], sleep: Callable[[float], None]
) -> list[int]:
    """The online nodes, once at least `want` (at least 1) are online or `timeout` passes."""
    want = max(want, 1)
    deadline = clock() + timeout
    while True:
        nodes = sorted(set(grid.get_node_ids()))
        if len(nodes) >= want:
            return nodes
        if clock() >= deadline:
            _log.warning("only %d of %d expected sites online after %.0f s; going on", len(nodes), want, timeout)
            return nodes
        sleep(NODE_POLL)


class _RoundKind(Protocol):
    """How a round's updates arrive: in the clear, or masked for secure aggregation."""

    announcement: bytes | None  # carried by the train message (secure aggregation's)
    like: Weights | None  # what a plain update must match; None for a masked upload

    def accept(self, node: int, reply: TrainReply) -> None: ...


class _PlainRound:
    """Updates in the clear, as `_exchange` receives them."""

    announcement: bytes | None = None

    def __init__(self, like: Weights) -> None:
        self.like: Weights | None = like
        self.updates: list[Weights] = []

    def accept(self, node: int, reply: TrainReply) -> None:
        if reply.update is None:
            raise RecordError("the reply carries no update")
        self.updates.append(reply.update)


class _SecureExchange:
    """Masked uploads, handed to the round's aggregator."""

    like: Weights | None = None

    def __init__(self, secure_round: SecureRound) -> None:
        self.round = secure_round
        self.announcement: bytes | None = secure_round.announcement

    def accept(self, node: int, reply: TrainReply) -> None:
        self.round.accept(node, reply.upload)


def _exchange(this: _Round, nodes: list[int], kind: _RoundKind, reporters: Mapping[int, str]) -> dict[int, SiteOutcome]:
    """Send the round to `nodes`, hand every reply's update to `kind` and its audit report to
    the round's audits; each node's outcome."""
    if not nodes:
        return {}
    grid, server_round, timeout, state, audits = this.grid, this.server_round, this.timeout, this.state, this.audits
    order = TrainOrder(
        weights=this.weights,
        server_round=server_round,
        announcement=kind.announcement,
        audits=audits.orders() if audits is not None else None,
    )
    content = order.to_content()
    messages = [
        Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round), ttl=timeout)
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    # Message ids are set when pushed; the SuperLink's own error replies come from node 0.
    node_of = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
    outcomes: dict[int, SiteOutcome] = {}
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if node not in nodes or node in outcomes:
            _log.warning("round %d: ignoring an unexpected or repeated reply for node %s", server_round, node)
            continue
        if reply.has_error():
            error = read_error(reply.error)
            state.learn(node, error.site)
            outcomes[node] = SiteOutcome.absent(error.outcome, error.reason, code=error.code)
            continue
        try:
            answer = TrainReply.from_content(reply.content, like=kind.like)
            # A bad audit report refuses the whole reply; a good one is written only once the
            # upload (signed with the site's key) has shown the reply comes from the enrolled site.
            reports = audits.check(answer.events, reporter=reporters.get(node)) if audits is not None else []
            kind.accept(node, answer)
        except (RecordError, TypeError, ValueError) as exc:
            outcomes[node] = SiteOutcome.absent(Status.FAILED, f"invalid reply: {exc}")
            continue
        except Exception as exc:  # a reply must never stop the round: one site's failure
            _log.exception("round %d: the reply of node %s could not be read", server_round, node)
            outcomes[node] = SiteOutcome.absent(Status.FAILED, f"invalid reply: {type(exc).__name__}")
            continue
        state.learn(node, answer.site or None)
        outcome = SiteOutcome.ok(answer.metrics)
        if audits is not None and reports:
            try:  # its update is in: a report the ledger refuses is noted, the outcome stays ok
                audits.record(reports)
            except RecordError as exc:
                _log.warning("round %d: node %s's audit report not recorded: %s", server_round, node, exc)
                outcome = outcome.model_copy(update={"reason": f"audit report not recorded: {exc}"})
        outcomes[node] = outcome
    missing = SiteOutcome.absent(Status.MISSING, f"no reply within {timeout:.0f} s")
    return {node: outcomes.get(node, missing) for node in nodes}  # in node order


class _RunState:
    """Site names (learned from replies), per-site history, refusals and absences."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # node id -> display name
        self.history: dict[int, list[SiteRound]] = {}
        self.rounds: list[RoundEvent] = []
        self.events: dict[str, list[SiteEvent]] = {"refusals": [], "failures": [], "missing": []}

    def learn(self, node: int, site: str | None) -> None:
        if not site or self.names.get(node) == site:
            return
        taken = {name for other, name in self.names.items() if other != node}
        # A site may not take another's name, nor a `node-<id>` name that is not its own: the
        # outcome of the node it names would be hidden behind it.
        default = re.fullmatch(r"node-\d+", site) is not None and site != f"node-{node}"
        self.names[node] = site if site not in taken and not default and "@" not in site else f"{site}@{node}"

    def name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def record_round(self, record: RoundEvent, outcomes: Mapping[int, SiteOutcome]) -> None:
        self.rounds.append(record)
        for node, outcome in outcomes.items():
            fields = outcome.model_dump(exclude_none=True, exclude={"round"})
            self.history.setdefault(node, []).append(SiteRound(round=record.round, **fields))
            where = RunSummary.list_for(outcome.status)
            if where is not None:
                self.events[where].append(SiteEvent(round=record.round, site=self.name(node), node_id=node, **fields))

    def summary(
        self, config: TrainConfig, final: Scores, initial: Scores, aggregation: str, *, mode: str, audited: bool
    ) -> RunSummary:
        sites = {}
        for node, history in self.history.items():
            epsilons = [h.epsilon for h in history if h.epsilon is not None]
            sites[self.name(node)] = SiteSummary(
                node_id=node,
                epsilon=epsilons[-1] if epsilons else None,
                rounds_trained=sum(h.status == Status.OK for h in history),  # its update is in the aggregate
                rounds_not_aggregated=sum(h.status == Status.NOT_AGGREGATED for h in history),
                history=history,
            )
        verify = None
        if audited:
            audits = sum(r.verify.audits for r in self.rounds if r.verify is not None)
            last = self.rounds[-1].verify if self.rounds else None
            verify = AuditSummary(audits=audits, quarantined=last.quarantined if last is not None else [])
        return RunSummary(
            mode="local" if mode == "local" else "federated",
            config=dataclasses.asdict(config),
            dp=config.dp,
            aggregation=aggregation,
            secure_agg=aggregation == "secure_aggregation",
            rounds=self.rounds,
            sites=sites,
            refusals=self.events["refusals"],
            failures=self.events["failures"],
            missing=self.events["missing"],
            final=final,
            initial=initial,
            verify=verify,
        )


def _checked_weights(weights: Mapping[str, np.ndarray]) -> Weights:
    if not weights:
        raise RoundError("the coordinator's initial weights are empty")
    # Round trip through the wire form: the same float32 and finiteness checks as every message.
    return from_array_record(to_array_record(weights))


def _check_aggregate(delta: Mapping[str, np.ndarray], weights: Weights) -> None:
    if delta.keys() != weights.keys() or any(np.shape(delta[k]) != weights[k].shape for k in weights):
        raise RoundError("the aggregate's names or shapes differ from the weights'")
    if not all(np.all(np.isfinite(delta[k])) for k in weights):
        raise RoundError("the aggregate holds NaN or infinite values")


def _scores(scores: Mapping[str, float]) -> Scores:
    """Held-out scores as JSON numbers: numpy scalars as Python ones, non-finite as None."""
    out: Scores = {}
    for key, value in scores.items():
        number = float(value)
        out[key] = number if math.isfinite(number) else None
    return out
