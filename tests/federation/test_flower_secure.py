"""Secure aggregation through the coordinator's loop and the ClientApp's handlers, in one
process: a fake Grid hands every message (keys query, train, unmask) to the real site
handlers of a throwaway consortium's sites, so everything but Flower's transport is real.
The e2e with real SuperLink and SuperNodes is `test_flower_rounds_e2e.py`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from corolla.federation.coordinator.rounds import run_rounds
from corolla.federation.coordinator.secure import SecureRounds
from corolla.federation.messages import (
    METRICS,
    ROUND,
    SECAGG,
    SERVER_ROUND,
    UNMASK_MESSAGE_TYPE,
    UPDATE,
    KeysQuery,
    KeysReply,
    TrainOrder,
    TrainReply,
    flatten,
    read_error,
    unflatten,
)
from corolla.federation.outcomes import RoundEvent, RunSummary, SiteMetrics, SiteOutcome, Status
from corolla.federation.progress import ProgressLog, format_round
from corolla.federation.site.env import SiteEnv, SiteResult
from corolla.federation.site.handlers import handle_keys_query, handle_train, handle_unmask
from corolla.pki import NodeIdentity
from corolla.platform.launch.federation import COORDINATOR
from corolla.secure_agg import FixedPoint, sign_enrolment
from corolla.training.config import TrainConfig

SHAPES = {"m.q_proj.lora_A.weight": (4, 16), "m.q_proj.lora_B.weight": (16, 4), "m.v_proj.lora_B.weight": (8,)}
RUN_ID = 7


def site_update(node: str, server_round: int) -> dict[str, np.ndarray]:
    """Each site's update: its own N(0, 0.05) values, different every round."""
    rng = np.random.default_rng([int(node.rsplit("-", 1)[1]), server_round])
    return {name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in SHAPES.items()}


class Sites:
    """Flower node id 100 + i is site-i; what each does with a message is the real handler,
    unless `drop` says the node is gone at that stage."""

    def __init__(self, consortium: Path, tmp_path: Path, names: tuple[str, ...], config: TrainConfig) -> None:
        data = tmp_path / "data.jsonl"
        data.write_text('{"text": "x"}\n')
        self.names = {100 + int(n.rsplit("-", 1)[1]): n for n in names}
        self.contexts = {
            node: Context(
                run_id=RUN_ID,
                node_id=node,
                node_config={
                    "data": str(data),
                    "store": str(tmp_path / "stores" / name),
                    "workspace": str(consortium),
                    "node": name,
                },
                state=RecordDict(),
                run_config=config.to_run_config(),
            )
            for node, name in self.names.items()
        }
        self.drop: dict[tuple[int, str], Callable[[int], bool]] = {}  # (node, stage) -> round -> gone?
        self.answer: dict[tuple[int, str], Callable[[Message], Message]] = {}  # (node, stage) -> a node's own answer
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.trained: dict[int, dict[int, dict[str, np.ndarray]]] = {}  # round -> node -> update
        self.calls: list[tuple[int, int]] = []  # (node, round) of every training the sites did
        self.metrics: Callable[[int], SiteMetrics] = lambda server_round: SiteMetrics(loss=1.0)  # what sites report

    def handle(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        kind = message.metadata.message_type
        stage = {MessageType.QUERY: "keys", MessageType.TRAIN: "train", UNMASK_MESSAGE_TYPE: "unmask"}[kind]
        server_round = int(message.content[ROUND][SERVER_ROUND]) if ROUND in message.content else 0
        if self.drop.get((node, stage), lambda _: False)(server_round):
            return None
        if (node, stage) in self.answer:  # a node that does not run the real handler
            return self.answer[(node, stage)](message)
        context = self.contexts[node]
        if stage == "keys":
            return handle_keys_query(message, context)
        if stage == "unmask":
            return handle_unmask(message, context)

        def site_round(
            config: Any, env: SiteEnv, weights: Any, *, server_round: int, run_key: str, orders: Any
        ) -> SiteResult:
            self.calls.append((node, server_round))
            update = site_update(env.node, server_round)
            self.trained.setdefault(server_round, {})[node] = update
            return SiteResult(update, self.metrics(server_round))

        return handle_train(message, context, site_round)


class FakeGrid:
    def __init__(self, sites: Sites) -> None:
        self.sites = sites

    def get_node_ids(self) -> list[int]:
        return list(self.sites.names)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as HttpGrid.push_messages
            self.sites.sent.append(message)
            reply = self.sites.handle(message)
            if reply is not None:
                self.sites.replies.append(reply)
                out.append(reply)
        return out


class Coordinator:
    def __init__(self) -> None:
        self.evaluated: list[dict[str, np.ndarray]] = []

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}

    def evaluate(
        self, weights: dict[str, np.ndarray], progress: Callable[[int, int], None] | None = None
    ) -> dict[str, float]:
        self.evaluated.append(weights)
        return {"loss": 1.0, "accuracy": 0.5, "chance": 0.25}

    def save(self, weights: dict[str, np.ndarray], summary: RunSummary) -> Path:
        return Path("adapter")


def _run(
    consortium: Path, tmp_path: Path, names: tuple[str, ...], *, rounds: int = 1, drop: dict | None = None
) -> tuple[dict[str, Any], Sites, Coordinator]:
    config = TrainConfig(
        model="m", out_dir=str(tmp_path / "out"), rounds=rounds, round_timeout=5.0, sites=len(names), dp_epsilon=None
    )
    sites = Sites(consortium, tmp_path, names, config)
    sites.drop.update(drop or {})
    secure = SecureRounds.for_node(consortium / "nodes" / COORDINATOR, run_key=f"flower-run-{RUN_ID}", clip=1.0)
    coordinator = Coordinator()
    with ProgressLog.in_dir(config.out_dir) as progress:
        summary: dict[str, Any] = run_rounds(
            FakeGrid(sites), config, coordinator, progress=progress, secure=secure
        ).to_json()
    return summary, sites, coordinator


def _secure(consortium: Path) -> SecureRounds:
    return SecureRounds.for_node(consortium / "nodes" / COORDINATOR, run_key=f"flower-run-{RUN_ID}", clip=1.0)


def _quantum(sites: int) -> float:
    return 2.0 ** -FixedPoint.for_sites(sites, clip=1.0).frac_bits


def test_the_secure_mean_equals_the_plain_mean_within_the_quantization_error(consortium: Path, tmp_path: Path) -> None:
    names = ("site-0", "site-1", "site-2")
    summary, sites, coordinator = _run(consortium, tmp_path, names, rounds=2)

    weights = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    for server_round in (1, 2):
        updates = sites.trained[server_round]
        assert len(updates) == 3
        plain = {k: np.mean([u[k].astype(np.float64) for u in updates.values()], axis=0) for k in SHAPES}
        weights = {k: weights[k] + plain[k] for k in SHAPES}
        got = coordinator.evaluated[server_round]  # evaluated[0] is the baseline
        for k in SHAPES:
            # each site rounds to the nearest multiple of the quantum: the mean is off by at most half of it,
            # plus float32 rounding of the weights
            np.testing.assert_allclose(got[k], weights[k], rtol=0, atol=_quantum(3) / 2 + 2e-7)
    rounds = [r for r in summary["rounds"]]
    assert [r["aggregated"] for r in rounds] == [3, 3]
    assert rounds[0]["secure_agg"] == {"uploads": 3, "survivors": 3, "dropped": 0, "unmask_answers": 3, "threshold": 3}
    assert summary["aggregation"] == "secure_aggregation" and summary["secure_agg"] is True

    # The coordinator never received an update in the clear: only masked uploads, 4 bytes per parameter.
    train_replies = [r for r in sites.replies if SECAGG in r.content and "upload" in r.content[SECAGG]]
    assert len(train_replies) == 6
    assert all(UPDATE not in r.content for r in sites.replies)
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    for reply in train_replies:
        upload = TrainReply.from_content(reply.content, like=None).upload
        assert upload is not None and 4 * params <= len(upload) < 4 * params + 4096
        masked = np.frombuffer(upload[-4 * params :], dtype="<u4")
        node = reply.metadata.src_node_id
        encoded = FixedPoint.for_sites(3, clip=1.0).encode(flatten(site_update(sites.names[node], 1))).ring
        assert np.mean(masked == encoded) < 0.01  # masked, not the encoding itself
    # The site's round secrets stayed on the site and were consumed by the unmask stage.
    for name in names:
        assert not list((tmp_path / "stores" / name / "secagg").rglob("round-*.json"))


def test_a_site_gone_after_the_key_stage_does_not_stop_the_round(consortium: Path, tmp_path: Path) -> None:
    names = ("site-0", "site-1", "site-2", "site-3")
    summary, sites, coordinator = _run(consortium, tmp_path, names, drop={(101, "train"): lambda r: True})

    [round_one] = summary["rounds"]
    assert round_one["aggregated"] == 3
    assert round_one["secure_agg"]["dropped"] == 1 and round_one["secure_agg"]["threshold"] == 3
    assert round_one["sites"]["node-101"]["status"] == "missing"
    survivors = sites.trained[1]
    assert set(survivors) == {100, 102, 103}
    for k in SHAPES:
        plain = np.mean([survivors[n][k].astype(np.float64) for n in survivors], axis=0)
        np.testing.assert_allclose(coordinator.evaluated[1][k], plain, rtol=0, atol=_quantum(4) / 2 + 2e-7)


def test_too_few_survivors_lose_the_round_not_the_run(consortium: Path, tmp_path: Path) -> None:
    names = ("site-0", "site-1", "site-2")  # threshold 3 of 3: a lying coordinator cannot unmask one site
    summary, _, coordinator = _run(consortium, tmp_path, names, rounds=2, drop={(102, "unmask"): lambda r: r == 1})

    first, second = summary["rounds"]
    assert first["kept"] and first["aggregated"] == 0
    assert "NotEnoughSurvivors" in first["secure_agg"]["error"] or "ReconstructionError" in first["secure_agg"]["error"]
    assert all(np.all(w == 0) for w in coordinator.evaluated[1].values())  # weights unchanged
    assert second["aggregated"] == 3 and not second["kept"]  # the next round goes on


def test_a_site_without_keys_is_left_out_and_says_why(consortium: Path, tmp_path: Path) -> None:
    names = ("site-0", "site-1", "site-2", "site-3")
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), rounds=1, round_timeout=5.0, dp_epsilon=None)
    sites = Sites(consortium, tmp_path, names, config)
    sites.contexts[103].node_config["workspace"] = ""  # this site has no identity for secure aggregation
    secure = SecureRounds.for_node(consortium / "nodes" / COORDINATOR, run_key=f"flower-run-{RUN_ID}", clip=1.0)
    with ProgressLog.in_dir(config.out_dir) as progress:
        summary: dict[str, Any] = run_rounds(
            FakeGrid(sites), config, Coordinator(), progress=progress, secure=secure
        ).to_json()

    [round_one] = summary["rounds"]
    assert round_one["aggregated"] == 3
    assert round_one["sites"]["node-103"]["status"] == "failed"
    assert "secure aggregation needs the site's identity" in round_one["sites"]["node-103"]["reason"]
    assert 103 not in sites.trained.get(1, {})  # never trained: it was not in the roster


def test_every_keys_query_carries_a_fresh_nonce_and_every_reply_proves_the_key(
    consortium: Path, tmp_path: Path
) -> None:
    names = ("site-0", "site-1", "site-2")
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), rounds=1, round_timeout=5.0, dp_epsilon=None)
    sites = Sites(consortium, tmp_path, names, config)
    secure = _secure(consortium)
    assert secure.enroll(FakeGrid(sites), [100, 101, 102], timeout=5.0) == {}

    assert {n: m.node_id for n, m in secure.members.items()} == {
        node: NodeIdentity.load(consortium / "nodes" / name).node_id for node, name in sites.names.items()
    }
    queries = [m.content[SECAGG] for m in sites.sent]
    assert all(q["ask"] == "keys" and q["run-id"] == f"flower-run-{RUN_ID}" for q in queries)
    nonces = [q["nonce"] for q in queries]
    assert all(isinstance(n, bytes) and len(n) == 32 for n in nonces) and len(set(nonces)) == 3
    assert all(isinstance(r.content[SECAGG]["proof"], bytes) for r in sites.replies)


def test_a_node_presenting_another_sites_certificates_is_refused_and_that_site_enrols(
    consortium: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Node 100 (site-0) answers first, with site-3's certificates, signed with its own key:
    without the proof it would take site-3's place and keep site-3 (node 103) out of the run."""
    names = ("site-0", "site-1", "site-2", "site-3")
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), rounds=1, round_timeout=5.0, dp_epsilon=None)
    sites = Sites(consortium, tmp_path, names, config)
    own, victim = (NodeIdentity.load(consortium / "nodes" / name) for name in ("site-0", "site-3"))

    def impersonate(message: Message) -> Message:
        query = KeysQuery.from_content(message.content)
        proof = sign_enrolment(
            node_id=victim.node_id,
            identity_key=own.identity_key_raw(),  # the only identity key this node holds
            run_id=query.run_id,
            nonce=query.nonce,
            flower_node=100,
            identity_cert=victim.identity_cert_der,
            agreement_cert=victim.agreement_cert_der,
        )
        reply = KeysReply(
            node_id=victim.node_id,
            identity_cert=victim.identity_cert_der,
            agreement_cert=victim.agreement_cert_der,
            proof=proof,
        )
        return Message(reply.to_content(), reply_to=message)

    sites.answer[(100, "keys")] = impersonate
    with caplog.at_level("WARNING"), ProgressLog.in_dir(config.out_dir) as progress:
        summary: dict[str, Any] = run_rounds(
            FakeGrid(sites), config, Coordinator(), progress=progress, secure=_secure(consortium)
        ).to_json()

    [round_one] = summary["rounds"]
    refused = round_one["sites"]["node-100"]
    assert refused["status"] == "failed"
    assert f"not signed by the identity key of {victim.node_id}" in refused["reason"]
    assert "node 100 left out of secure aggregation" in caplog.text
    assert round_one["aggregated"] == 3 and round_one["sites"]["site-3"]["status"] == "ok"  # the run goes on
    assert set(sites.trained[1]) == {101, 102, 103}


def test_a_keys_reply_replayed_from_an_earlier_query_is_refused(consortium: Path, tmp_path: Path) -> None:
    names = ("site-0", "site-1", "site-2")
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), rounds=1, round_timeout=5.0, dp_epsilon=None)
    sites = Sites(consortium, tmp_path, names, config)
    grid = FakeGrid(sites)
    assert _secure(consortium).enroll(grid, [100, 101, 102], timeout=5.0) == {}
    [earlier] = [r for m, r in zip(sites.sent, sites.replies, strict=True) if m.metadata.dst_node_id == 100]

    # A coordinator asking again (a restarted ServerApp, same run) gets site-0's earlier answer back.
    sites.answer[(100, "keys")] = lambda message: Message(
        RecordDict({SECAGG: _config(dict(earlier.content[SECAGG]))}), reply_to=message
    )
    secure = _secure(consortium)
    outcomes = secure.enroll(grid, [100, 101, 102], timeout=5.0)
    assert set(outcomes) == {100} and outcomes[100].status == "failed"
    assert "answers another query" in (outcomes[100].reason or "")
    assert set(secure.members) == {101, 102}


def test_a_keys_reply_relayed_from_another_flower_node_is_refused(consortium: Path, tmp_path: Path) -> None:
    """Node 103 hands its query to site-0 (node 100, which the coordinator did not ask) and
    returns site-0's genuine answer as its own: signed for node 100, so refused."""
    names = ("site-0", "site-1", "site-2", "site-3")
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), rounds=1, round_timeout=5.0, dp_epsilon=None)
    sites = Sites(consortium, tmp_path, names, config)
    sites.answer[(103, "keys")] = lambda message: handle_keys_query(message, sites.contexts[100])
    secure = _secure(consortium)
    outcomes = secure.enroll(FakeGrid(sites), [101, 102, 103], timeout=5.0)
    assert set(outcomes) == {103} and outcomes[103].status == "failed"
    assert "signed for Flower node 100, but came from node 103" in (outcomes[103].reason or "")
    assert set(secure.members) == {101, 102}


def test_a_site_signs_only_a_keys_query_of_its_own_run_with_a_nonce(consortium: Path, tmp_path: Path) -> None:
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), rounds=1, round_timeout=5.0, dp_epsilon=None)
    sites = Sites(consortium, tmp_path, ("site-0",), config)
    cases = {
        "the keys query carries no nonce: this site signs its keys only over a fresh one": {
            "ask": "keys",
            "run-id": f"flower-run-{RUN_ID}",
        },
        f"this site is in run flower-run-{RUN_ID}": {"ask": "keys", "run-id": "flower-run-8", "nonce": bytes(32)},
        "nonce must be 32 bytes": {"ask": "keys", "run-id": f"flower-run-{RUN_ID}", "nonce": bytes(8)},
    }
    for reason, query in cases.items():
        message = Message(RecordDict({SECAGG: _config(query)}), dst_node_id=100, message_type=MessageType.QUERY)
        reply = handle_keys_query(message, sites.contexts[100])
        assert reply.has_error() and reason in read_error(reply.error).reason


def test_a_secure_round_lost_after_the_uploads_counts_for_no_site(consortium: Path, tmp_path: Path) -> None:
    """Round 1: site-1 never uploads, site-2 uploads but does not answer the unmask request:
    2 answers of threshold 3, the round is lost. Every site that uploaded trained (and spent
    its privacy budget) but is in no aggregate; round 2 completes with the same three."""
    names = ("site-0", "site-1", "site-2", "site-3")
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), rounds=2, round_timeout=5.0, dp_epsilon=3.0)
    sites = Sites(consortium, tmp_path, names, config)
    sites.metrics = lambda server_round: SiteMetrics(loss=1.0, epsilon=0.5 * server_round)  # spent before training
    sites.drop.update({(101, "train"): lambda r: True, (102, "unmask"): lambda r: r == 1})
    with ProgressLog.in_dir(config.out_dir) as progress:
        summary: dict[str, Any] = run_rounds(
            FakeGrid(sites), config, Coordinator(), progress=progress, secure=_secure(consortium)
        ).to_json()

    first, second = summary["rounds"]
    assert first["kept"] and first["aggregated"] == 0 and "NotEnoughSurvivors" in first["secure_agg"]["error"]
    assert first["secure_agg"]["uploads"] == 3
    uploaded = ("site-0", "site-2", "site-3")
    for name in uploaded:
        outcome = first["sites"][name]
        assert outcome["status"] == "not_aggregated"
        assert "not aggregated: secure aggregation failed (NotEnoughSurvivors" in outcome["reason"]
        assert "privacy budget it spent on the round stays spent" in outcome["reason"]
        assert outcome["epsilon"] == 0.5  # the round's privacy cost is kept in the records
    assert first["sites"]["node-101"]["status"] == "missing"  # a site that never uploaded stays what it was
    assert second["aggregated"] == 3 and all(second["sites"][name]["status"] == "ok" for name in uploaded)

    for name in uploaded:
        site = summary["sites"][name]
        assert site["rounds_trained"] == 1 and site["rounds_not_aggregated"] == 1
        assert site["epsilon"] == 1.0  # both rounds spent budget
    assert summary["sites"]["node-101"]["rounds_trained"] == 0
    assert summary["failures"] == summary["refusals"] == []  # a lost round is no site's failure
    # The progress log says the same as the summary.
    events = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").read_text().splitlines()]
    [logged] = [e for e in events if e["event"] == "round" and e["round"] == 1]
    assert {name: info["status"] for name, info in logged["sites"].items()} == {
        "site-0": "not_aggregated",
        "node-101": "missing",
        "site-2": "not_aggregated",
        "site-3": "not_aggregated",
    }
    assert "secure aggregation failed (NotEnoughSurvivors" in format_round(RoundEvent.model_validate(logged))


def test_an_upload_presented_by_another_node_is_refused(consortium: Path, tmp_path: Path) -> None:
    names = ("site-0", "site-1", "site-2")
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), rounds=1, round_timeout=5.0, dp_epsilon=None)
    sites = Sites(consortium, tmp_path, names, config)
    secure = SecureRounds.for_node(consortium / "nodes" / COORDINATOR, run_key=f"flower-run-{RUN_ID}", clip=1.0)
    grid = FakeGrid(sites)
    assert secure.enroll(grid, [100, 101, 102], timeout=5.0) == {}
    weights = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    secure_round = secure.round([100, 101, 102], 1, weights)
    train = Message(
        TrainOrder(weights=weights, server_round=1, announcement=secure_round.announcement).to_content(),
        dst_node_id=100,
        message_type=MessageType.TRAIN,
        group_id="1",
    )
    [reply] = grid.send_and_receive([train])
    upload = TrainReply.from_content(reply.content, like=None).upload
    with pytest.raises(Exception, match="delivered as"):
        secure_round.accept(101, upload)  # site-0's upload claimed by node 101
    secure_round.accept(100, upload)
    assert secure_round.uploads == 1
    assert METRICS in reply.content

    # The same announcement again: the site has already uploaded for this round and refuses,
    # before training: a replayed round costs it no privacy budget.
    trained = len(sites.calls)
    again = Message(train.content, dst_node_id=100, message_type=MessageType.TRAIN, group_id="1")
    [refused] = grid.send_and_receive([again])
    assert refused.has_error() and "already uploaded for round 1" in read_error(refused.error).reason
    assert len(sites.calls) == trained


def test_an_announcement_the_site_would_refuse_costs_no_training(consortium: Path, tmp_path: Path) -> None:
    from corolla.secure_agg import Aggregator

    names = ("site-0", "site-1", "site-2", "site-3")
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), rounds=1, round_timeout=5.0, dp_epsilon=None)
    sites = Sites(consortium, tmp_path, names, config)
    secure = SecureRounds.for_node(consortium / "nodes" / COORDINATOR, run_key=f"flower-run-{RUN_ID}", clip=1.0)
    grid = FakeGrid(sites)
    secure.enroll(grid, [100, 101, 102, 103], timeout=5.0)
    weights = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    low = Aggregator(  # threshold 2 of 4: a coordinator lying about dropouts could unmask one site
        run_id=f"flower-run-{RUN_ID}",
        round=1,
        members=[secure.members[n] for n in (100, 101, 102, 103)],
        encoding=FixedPoint.for_sites(4, clip=1.0),
        length=sum(int(np.prod(s)) for s in SHAPES.values()),
        coordinator=secure.keys,
        verifier=secure.verifier,
        threshold=2,
    )
    train = Message(
        TrainOrder(weights=weights, server_round=1, announcement=low.announcement).to_content(),
        dst_node_id=100,
        message_type=MessageType.TRAIN,
        group_id="1",
    )
    [refused] = grid.send_and_receive([train])
    assert refused.has_error() and "below this site's minimum 3" in read_error(refused.error).reason
    assert sites.calls == []  # refused before training


def test_flatten_and_unflatten_are_inverse() -> None:
    weights = site_update("site-3", 9)
    vector = flatten(weights)
    assert vector.dtype == np.float32 and vector.shape == (sum(int(np.prod(s)) for s in SHAPES.values()),)
    back = unflatten(vector, weights)
    assert list(back) == sorted(weights)
    assert all(np.array_equal(back[k], weights[k]) for k in weights)
    with pytest.raises(Exception, match="the weights have"):
        unflatten(vector[:-1], weights)


def _config(values: dict[str, Any]) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord(values)


def test_a_site_pruned_in_a_round_is_not_enrolled_again_in_that_round(
    consortium: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site whose certificate stopped holding sits the round out, even if it could enrol
    afresh (a renewed certificate): it neither trains nor counts as failed while its update is in."""
    real_prune = SecureRounds.prune
    rounds_pruned: list[int] = []

    def prune(self: SecureRounds, nodes: list[int]) -> dict[int, SiteOutcome]:
        rounds_pruned.append(0)
        if len(rounds_pruned) == 2 and 100 in self.members:  # round 2: node 100's certificate no longer holds
            del self.members[100]
            return {100: SiteOutcome.absent(Status.FAILED, "left the run: its certificate no longer holds")}
        return real_prune(self, nodes)

    monkeypatch.setattr(SecureRounds, "prune", prune)
    summary, sites, _ = _run(consortium, tmp_path, ("site-0", "site-1", "site-2"), rounds=2)
    first, second = summary["rounds"]
    assert first["aggregated"] == 3
    assert (100, 2) not in sites.calls and {(101, 2), (102, 2)} <= set(sites.calls)
    assert second["aggregated"] == 2 and second["sites"]["site-0"]["status"] == "failed"
    assert summary["sites"]["site-0"]["rounds_trained"] == 1
