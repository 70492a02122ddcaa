"""The coordinator's loop over Flower rounds, independent of the model being trained.

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
  replies with its own codes instead (`records.SITE_REFUSED` etc.).
- `Grid.get_node_ids()` lists the nodes the SuperLink holds online now (same heartbeat rule).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from corolla.errors import CorollaError
from corolla.federation.audits import VERIFY
from corolla.federation.messages import (
    METRICS,
    ROUND,
    SERVER_ROUND,
    SITE,
    UPDATE,
    WEIGHTS,
    RecordError,
    Weights,
    from_array_record,
    from_metrics_record,
    read_error,
    to_array_record,
)
from corolla.federation.progress import ProgressLog
from corolla.federation.secure import SecureRounds
from corolla.training.config import TrainConfig

_log = logging.getLogger(__name__)

Aggregate = Callable[[list[Weights]], Weights]
NODE_POLL = 1.0  # seconds between looks at the online nodes while waiting for sites
# A site's round outcome when it trained and uploaded but the round's secure aggregation was
# lost after the uploads: its update is in no aggregate, its privacy spending for the round stands.
NOT_AGGREGATED = "not_aggregated"


class RoundError(CorollaError):
    """The coordinator's loop cannot go on (e.g. an aggregate of the wrong shape)."""


class CoordinatorLike(Protocol):
    """What the loop needs from the model side (`corolla.federation.coordinator.model`)."""

    def initial_weights(self) -> dict[str, np.ndarray]: ...

    def evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, float]: ...

    def save(self, weights: dict[str, np.ndarray], summary: dict[str, Any]) -> Path: ...


def mean_update(updates: list[Weights]) -> Weights:
    """The uniform mean of the updates (not weighted by record counts: that would reveal them)."""
    if not updates:
        raise ValueError("mean_update needs at least one update")
    first = updates[0]
    for update in updates[1:]:
        if update.keys() != first.keys() or any(update[k].shape != first[k].shape for k in first):
            raise ValueError("updates differ in names or shapes")
    out: Weights = {}
    for name in first:
        total = np.zeros(first[name].shape, dtype=np.float64)
        for update in updates:
            total += update[name]
        out[name] = (total / len(updates)).astype(np.float32)
    return out


def run_rounds(
    grid: Grid,
    config: TrainConfig,
    coordinator: CoordinatorLike,
    *,
    progress: ProgressLog,
    secure: SecureRounds | None = None,
    audits: AuditsLike | None = None,
    aggregate: Aggregate = mean_update,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Run `config.rounds` rounds; save through `coordinator.save` and return the summary
    (with "adapter", the directory `save` returned).

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
        {
            "event": "start",
            "rounds": config.rounds,
            "dp": config.dp,
            "dp_epsilon": config.dp_epsilon,
            "secure_agg": secure is not None,
            "aggregation": aggregation,
            "sites_expected": config.sites,
        }
    )
    started = clock()
    initial = {key: _jsonable(value) for key, value in coordinator.evaluate(weights).items()}
    progress.emit(
        {
            "event": "baseline",
            "round": 0,
            "rounds": config.rounds,
            "seconds": round(clock() - started, 3),
            "eval": initial,
            "dp": config.dp,
            "sites": {},
        }
    )
    evaluation: dict[str, Any] = {}
    for server_round in range(1, config.rounds + 1):
        started = clock()
        want = config.sites if server_round == 1 else 1
        nodes = _wait_for_nodes(grid, want=want, timeout=config.round_timeout, clock=clock, sleep=sleep)
        delta, aggregated, outcomes, secure_info = _train_round(
            grid, nodes, weights, server_round, config.round_timeout, state, secure, audits, aggregate
        )
        if delta is not None:
            _check_aggregate(delta, weights)
            weights = {name: (weights[name] + delta[name]).astype(np.float32) for name in weights}
        else:
            _log.warning("round %d: no update to aggregate; the weights are unchanged", server_round)
        evaluation = {key: _jsonable(value) for key, value in coordinator.evaluate(weights).items()}
        record = {
            "round": server_round,
            "rounds": config.rounds,
            "seconds": round(clock() - started, 3),
            "nodes": len(nodes),
            "aggregated": aggregated,
            "kept": delta is None,
            "eval": evaluation,
            "dp": config.dp,
            "sites": {state.name(node): info for node, info in outcomes.items()},
        }
        if secure_info is not None:
            record["secure_agg"] = secure_info
        if audits is not None:
            record["verify"] = audits.round_info()
        progress.emit({"event": "round", **record})
        state.record_round(record, outcomes)
    summary = {**state.summary(config, evaluation, aggregation), "initial": initial}
    if audits is not None:
        summary["verify"] = {
            "audits": sum(r.get("verify", {}).get("audits", 0) for r in state.rounds),
            "quarantined": state.rounds[-1]["verify"]["quarantined"] if state.rounds else [],
        }
    adapter = coordinator.save(weights, summary)
    progress.emit({"event": "done", "adapter": str(adapter), "summary": str(Path(config.out_dir) / "summary.json")})
    return {**summary, "adapter": str(adapter)}


def _train_round(
    grid: Grid,
    nodes: list[int],
    weights: Weights,
    server_round: int,
    timeout: float,
    state: _RunState,
    secure: SecureRounds | None,
    audits: AuditsLike | None,
    aggregate: Aggregate,
) -> tuple[Weights | None, int, dict[int, dict[str, Any]], dict[str, Any] | None]:
    """One round: (the mean update or None, how many sites it averages, each node's
    outcome, what secure aggregation reports or None when it is off)."""
    if secure is None:
        plain = _PlainRound(weights)
        outcomes = _exchange(grid, nodes, weights, server_round, timeout, state, plain, audits, {})
        return (aggregate(plain.updates) if plain.updates else None), len(plain.updates), outcomes, None

    from corolla.secure_agg import SecureAggregationError

    failed = {**secure.prune(nodes), **secure.enroll(grid, nodes, timeout)}
    members = [node for node in nodes if node in secure.members]
    try:
        secure_round = secure.round(members, server_round, weights)
    except SecureAggregationError as exc:  # e.g. fewer than 2 sites with keys
        _log.warning("round %d: no secure aggregation possible: %s", server_round, exc)
        return (
            None,
            0,
            {node: failed.get(node, {"status": "skipped", "reason": str(exc)}) for node in nodes},
            {"error": f"{type(exc).__name__}: {exc}"},
        )
    reporters = {node: secure.members[node].node_id for node in members}  # audits must come from these ids
    outcomes = _exchange(grid, members, weights, server_round, timeout, state, secure_round, audits, reporters)
    outcomes = {node: failed[node] if node in failed else outcomes[node] for node in nodes}
    if not secure_round.uploads:
        return None, 0, outcomes, {"uploads": 0, "threshold": secure_round.aggregator.threshold}
    try:
        delta, info = secure_round.finish(grid, timeout)
    except SecureAggregationError as exc:  # too few survivors, a sum out of range: the round is lost
        _log.warning("round %d: secure aggregation failed: %s", server_round, exc)
        error = f"{type(exc).__name__}: {exc}"
        return None, 0, _not_aggregated(outcomes, error), {"uploads": secure_round.uploads, "error": error}
    return delta, info["survivors"], outcomes, {"uploads": secure_round.uploads, **info}


def _not_aggregated(outcomes: Mapping[int, dict[str, Any]], error: str) -> dict[int, dict[str, Any]]:
    """The outcomes of a secure round lost after the uploads: every site whose upload was
    accepted trained, but its update is in no aggregate. Its metrics stay as it reported them
    (its epsilon included: the round's privacy cost was charged before training)."""
    reason = (
        f"trained, but its update was not aggregated: secure aggregation failed ({error}); "
        "any privacy budget it spent on the round stays spent"
    )
    return {
        node: {**info, "status": NOT_AGGREGATED, "reason": reason} if info["status"] == "ok" else info
        for node, info in outcomes.items()
    }


def _wait_for_nodes(
    grid: Grid, *, want: int, timeout: float, clock: Callable[[], float], sleep: Callable[[float], None]
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


class _PlainRound:
    """Updates in the clear, as `_exchange` receives them."""

    def __init__(self, like: Weights) -> None:
        self.like = like
        self.updates: list[Weights] = []

    def train_records(self) -> dict[str, ConfigRecord]:
        return {}

    def accept(self, node: int, content: RecordDict) -> None:
        try:
            record = content[UPDATE]
        except KeyError:
            raise RecordError("the reply carries no update") from None
        self.updates.append(from_array_record(record, like=self.like))


class AuditsLike(Protocol):
    """What the loop needs from the coordinator's spot checks (`training.verification`)."""

    def train_record(self) -> ConfigRecord: ...

    def check(self, content: RecordDict, *, reporter: str | None) -> list[Any]: ...

    def record(self, events: list[Any]) -> int: ...

    def round_info(self) -> dict[str, Any]: ...


class _RoundLike(Protocol):
    def train_records(self) -> dict[str, ConfigRecord]: ...

    def accept(self, node: int, content: RecordDict) -> None: ...


def _exchange(
    grid: Grid,
    nodes: list[int],
    weights: Weights,
    server_round: int,
    timeout: float,
    state: _RunState,
    round_: _RoundLike,
    audits: AuditsLike | None,
    reporters: Mapping[int, str],
) -> dict[int, dict[str, Any]]:
    """Send the round to `nodes`, hand every reply's update to `round_` and its audit report
    to `audits`; each node's outcome."""
    if not nodes:
        return {}
    records: dict[str, Any] = {
        WEIGHTS: to_array_record(weights),
        ROUND: ConfigRecord({SERVER_ROUND: server_round}),
        **round_.train_records(),
    }
    if audits is not None:
        records[VERIFY] = audits.train_record()
    content = RecordDict(records)
    messages = [
        Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round), ttl=timeout)
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    # Message ids are set when pushed; the SuperLink's own error replies come from node 0.
    node_of = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
    outcomes: dict[int, dict[str, Any]] = {}
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if node not in nodes or node in outcomes:
            _log.warning("round %d: ignoring an unexpected or repeated reply for node %s", server_round, node)
            continue
        if reply.has_error():
            error = read_error(reply.error)
            state.learn(node, error.site)
            outcomes[node] = {"status": error.outcome, "reason": error.reason, "code": error.code}
            continue
        try:
            metrics = from_metrics_record(reply.content[METRICS])
            # A bad audit report refuses the whole reply; a good one is written only once the
            # upload (signed with the site's key) has shown the reply comes from the enrolled site.
            reports = audits.check(reply.content, reporter=reporters.get(node)) if audits is not None else []
            round_.accept(node, reply.content)
            if audits is not None and reports:
                audits.record(reports)
        except (RecordError, KeyError, TypeError, ValueError) as exc:
            outcomes[node] = {"status": "failed", "reason": f"invalid reply: {exc}"}
            continue
        site = metrics.pop(SITE, None)
        state.learn(node, site if isinstance(site, str) else None)
        outcomes[node] = {"status": "ok", **metrics}
    missing = {"status": "missing", "reason": f"no reply within {timeout:.0f} s"}
    return {node: outcomes.get(node, dict(missing)) for node in nodes}  # in node order


class _RunState:
    """Site names (learned from replies), per-site history, refusals and absences."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # node id -> display name
        self.history: dict[int, list[dict[str, Any]]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.events: dict[str, list[dict[str, Any]]] = {"refusals": [], "failures": [], "missing": []}

    def learn(self, node: int, site: str | None) -> None:
        if not site or self.names.get(node) == site:
            return
        taken = {name for other, name in self.names.items() if other != node}
        self.names[node] = site if site not in taken else f"{site}@{node}"  # two nodes claiming one name

    def name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def record_round(self, record: dict[str, Any], outcomes: Mapping[int, dict[str, Any]]) -> None:
        self.rounds.append(record)
        for node, info in outcomes.items():
            self.history.setdefault(node, []).append({"round": record["round"], **info})
            kind = {"refused": "refusals", "failed": "failures", "offline": "missing", "missing": "missing"}
            if info["status"] in kind:
                self.events[kind[info["status"]]].append(
                    {"round": record["round"], "site": self.name(node), "node_id": node, **info}
                )

    def summary(self, config: TrainConfig, final: dict[str, Any], aggregation: str) -> dict[str, Any]:
        sites = {}
        for node, history in self.history.items():
            epsilons = [h["epsilon"] for h in history if isinstance(h.get("epsilon"), int | float)]
            sites[self.name(node)] = {
                "node_id": node,
                "epsilon": epsilons[-1] if epsilons else None,
                "rounds_trained": sum(h["status"] == "ok" for h in history),  # its update is in the aggregate
                # trained (privacy budget spent) but lost with the round's secure aggregation
                "rounds_not_aggregated": sum(h["status"] == NOT_AGGREGATED for h in history),
                "history": history,
            }
        return {
            "config": dataclasses.asdict(config),
            "dp": config.dp,
            "aggregation": aggregation,
            "secure_agg": aggregation == "secure_aggregation",
            "rounds": self.rounds,
            "sites": sites,
            **self.events,
            "final": final,
        }


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
