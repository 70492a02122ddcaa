"""A site checks everything the coordinator sends before it charges its privacy ledger.

Each malformed train message goes through the real ClientApp body (`handle_train`) with the
real site round (`train_site_round`): the reply is a typed error, and the site's store (its
privacy ledger, its secure-aggregation state) is byte-for-byte what it was. The ledger exists
beforehand (one round charged), so an unchanged file means nothing was charged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from corolla.federation.messages import (
    ROUND,
    SECAGG,
    SERVER_ROUND,
    SITE_FAILED,
    SITE_REFUSED,
    VERIFY,
    WEIGHTS,
    read_error,
    run_key,
)
from corolla.federation.site.env import SiteEnv
from corolla.federation.site.handlers import handle_train
from corolla.federation.site.round import charge_round, prepare_round, train_site_round
from corolla.inference.client import LoraAdapter
from corolla.inference.models import Checkpoint
from corolla.pki import NodeIdentity
from corolla.platform.launch.federation import COORDINATOR
from corolla.secure_agg import Aggregator, CoordinatorKeys, FixedPoint, Member
from corolla.training.clinical import synthetic_clinical
from corolla.training.config import TrainConfig
from corolla.training.data import write_jsonl
from corolla.training.plan import lora_settings

RUN_ID = 77
SITES = ("site-0", "site-1", "site-2")


class Site:
    """site-0 of the consortium, with its records and a ledger already charged once."""

    def __init__(self, tiny_llama: Path, consortium: Path, tmp_path: Path, *, secure: bool) -> None:
        data = synthetic_clinical(sites=1, records_per_site=32, test_records=4, seed=3)
        write_jsonl(data.sites[0], tmp_path / "site.jsonl")
        self.config = TrainConfig(
            model=str(tiny_llama),
            out_dir=str(tmp_path / "out"),
            rounds=3,
            steps_per_round=2,
            batch_size=8,
            dp_epsilon=3.0,
            secure_agg=secure,
            audit_rate=0.0,
            servers=("127.0.0.1:1",),  # never reached: every message here is refused before training
        )
        self.store = tmp_path / "store"
        self.context = Context(
            run_id=RUN_ID,
            node_id=100,
            node_config={
                "data": str(tmp_path / "site.jsonl"),
                "store": str(self.store),
                "workspace": str(consortium),
                "node": SITES[0],
                "allow-plain-updates": not secure,
            },
            state=RecordDict(),
            run_config=self.config.to_run_config(),
        )
        checkpoint = Checkpoint.open(tiny_llama)
        adapter = LoraAdapter.init(checkpoint, lora_settings(self.config))
        self.weights = {name: t.numpy() for name, t in adapter.state().items()}
        env = SiteEnv.from_node_config(self.context.node_config)
        prepared = prepare_round(self.config, env, self.weights, run_key=run_key(self.context))
        assert charge_round(self.config, env, prepared, run_key=run_key(self.context)) > 0  # a ledger with one charge
        self.consortium = consortium

    def store_bytes(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.store)): p.read_bytes() for p in sorted(self.store.rglob("*")) if p.is_file()}

    def send(self, content: RecordDict) -> tuple[int, str]:
        message = Message(content, dst_node_id=100, message_type=MessageType.TRAIN, group_id="2")
        reply = handle_train(message, self.context, train_site_round)
        assert reply.has_error()
        error = read_error(reply.error)
        return error.code, error.reason

    def announcement(
        self, *, run_id: str | None = None, length_extra: int = 0, threshold: int | None = None, round_: int = 2
    ) -> bytes:
        identities = [NodeIdentity.load(self.consortium / "nodes" / name) for name in SITES]
        coordinator = NodeIdentity.load(self.consortium / "nodes" / COORDINATOR)
        aggregator = Aggregator(
            run_id=run_id or run_key(self.context),
            round=round_,
            members=[
                Member(node_id=i.node_id, identity_cert=i.identity_cert_der, agreement_cert=i.agreement_cert_der)
                for i in identities
            ],
            encoding=FixedPoint.for_sites(len(SITES), clip=1.0),
            length=sum(int(np.size(w)) for w in self.weights.values()) + length_extra,
            coordinator=CoordinatorKeys(
                node_id=coordinator.node_id,
                identity_key=coordinator.identity_key_raw(),
                identity_cert=coordinator.identity_cert_der,
            ),
            verifier=coordinator.verifier(),
            threshold=threshold,
        )
        return aggregator.announcement


def _arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in weights.items()})


def _round(value: object = 2) -> ConfigRecord:
    return ConfigRecord({SERVER_ROUND: value})  # type: ignore[dict-item]


def _train(weights: ArrayRecord | None, round_: ConfigRecord | None = None, **extra: ConfigRecord) -> RecordDict:
    records: dict[str, ArrayRecord | ConfigRecord] = {} if weights is None else {WEIGHTS: weights}
    records[ROUND] = round_ if round_ is not None else _round()
    records.update(extra)
    return RecordDict(records)  # type: ignore[arg-type]


def _changed(weights: dict[str, np.ndarray], how: Callable[[dict[str, np.ndarray]], None]) -> ArrayRecord:
    copy = {name: value.copy() for name, value in weights.items()}
    how(copy)
    return _arrays(copy)


def _first(weights: dict[str, np.ndarray]) -> str:
    return sorted(weights)[0]


# Each case: (id, how to make the content from the site's good weights, the error class the site names).
PLAIN_CASES: list[tuple[str, Callable[[dict[str, np.ndarray]], RecordDict], str]] = [
    ("no weights", lambda w: _train(None), "RecordError"),
    ("a weight missing", lambda w: _train(_changed(w, lambda c: c.pop(_first(c))), None), "RecordError"),
    (
        "an unexpected weight",
        lambda w: _train(_changed(w, lambda c: c.__setitem__("base.extra.lora_A", np.zeros(2, np.float32)))),
        "RecordError",
    ),
    (
        "a weight of another shape",
        lambda w: _train(_changed(w, lambda c: c.__setitem__(_first(c), np.zeros((1, 1), np.float32)))),
        "RecordError",
    ),
    (
        "float64 weights",
        lambda w: _train(_arrays({k: v.astype(np.float64) for k, v in w.items()})),
        "RecordError",
    ),
    ("integer weights", lambda w: _train(_arrays({k: v.astype(np.int32) for k, v in w.items()})), "RecordError"),
    (
        "a NaN",
        lambda w: _train(_changed(w, lambda c: c[_first(c)].reshape(-1).__setitem__(0, np.nan))),
        "RecordError",
    ),
    (
        "an infinity",
        lambda w: _train(_changed(w, lambda c: c[_first(c)].reshape(-1).__setitem__(0, -np.inf))),
        "RecordError",
    ),
    ("no round number", lambda w: _train(_arrays(w), ConfigRecord({"other": 1})), "RecordError"),
    ("round 0", lambda w: _train(_arrays(w), _round(0)), "RecordError"),
    ("a round that is text", lambda w: _train(_arrays(w), _round("2")), "RecordError"),
    (
        "an audit rate above 1",
        lambda w: _train(_arrays(w), None, **{VERIFY: ConfigRecord({"rate": 2.0, "quarantine": []})}),
        "RecordError",
    ),
    (
        "a quarantine that is not an event",
        lambda w: _train(_arrays(w), None, **{VERIFY: ConfigRecord({"rate": 0.1, "quarantine": ["{}"]})}),
        "RecordError",
    ),
    (
        "a malformed tolerance table",
        lambda w: _train(
            _arrays(w), None, **{VERIFY: ConfigRecord({"rate": 0.1, "quarantine": [], "tolerances": "{]"})}
        ),
        "RecordError",
    ),
    (
        "an announcement in a run without secure aggregation that is not one",
        lambda w: _train(_arrays(w), None, **{SECAGG: ConfigRecord({"announcement": b"\x00" * 40})}),
        "MalformedMessage",
    ),
]


@pytest.mark.parametrize(("case", "make", "error"), PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES])
def test_a_malformed_train_message_is_refused_before_the_ledger_is_charged(
    tiny_llama: Path,
    consortium: Path,
    tmp_path: Path,
    case: str,
    make: Callable[[dict[str, np.ndarray]], RecordDict],
    error: str,
) -> None:
    site = Site(tiny_llama, consortium, tmp_path, secure=False)
    before = site.store_bytes()
    assert any(name.startswith("privacy/") for name in before), before.keys()
    code, reason = site.send(make(site.weights))
    assert code == SITE_FAILED, (case, reason)
    assert reason.startswith(f"{error}: "), (case, reason)
    assert site.store_bytes() == before, case


SECURE_CASES: list[tuple[str, Callable[[Site], RecordDict], str]] = [
    ("no announcement in a secure run", lambda s: _train(_arrays(s.weights)), "RecordError"),
    (
        "an announcement that does not parse",
        lambda s: _train(_arrays(s.weights), None, **{SECAGG: ConfigRecord({"announcement": b"\x01" * 64})}),
        "MalformedMessage",
    ),
    (
        "an announcement without bytes",
        lambda s: _train(_arrays(s.weights), None, **{SECAGG: ConfigRecord({"announcement": "text"})}),
        "RecordError",
    ),
    (
        "an announcement for another run",
        lambda s: _train(
            _arrays(s.weights), None, **{SECAGG: ConfigRecord({"announcement": s.announcement(run_id="flower-run-1")})}
        ),
        "ReplayedMessage",
    ),
    (
        "an announcement of another length",
        lambda s: _train(
            _arrays(s.weights), None, **{SECAGG: ConfigRecord({"announcement": s.announcement(length_extra=1)})}
        ),
        "RefusedRequest",
    ),
    (
        "an announcement with a threshold a lying coordinator could exploit",
        lambda s: _train(
            _arrays(s.weights), None, **{SECAGG: ConfigRecord({"announcement": s.announcement(threshold=2)})}
        ),
        "RefusedRequest",
    ),
    (
        "an announcement for another round than the message's",
        lambda s: _train(
            _arrays(s.weights), None, **{SECAGG: ConfigRecord({"announcement": s.announcement(round_=3)})}
        ),
        "RefusedRequest",
    ),
    (
        "a good announcement with weights of another shape",
        lambda s: _train(
            _changed(s.weights, lambda c: c.__setitem__(_first(c), np.zeros(np.size(c[_first(c)]), np.float32))),
            None,
            **{SECAGG: ConfigRecord({"announcement": s.announcement()})},
        ),
        "RecordError",
    ),
]


@pytest.mark.parametrize(("case", "make", "error"), SECURE_CASES, ids=[c[0] for c in SECURE_CASES])
def test_a_bad_secure_round_is_refused_before_the_ledger_is_charged(
    tiny_llama: Path,
    consortium: Path,
    tmp_path: Path,
    case: str,
    make: Callable[[Site], RecordDict],
    error: str,
) -> None:
    site = Site(tiny_llama, consortium, tmp_path, secure=True)
    before = site.store_bytes()
    code, reason = site.send(make(site))
    assert code == SITE_FAILED, (case, reason)
    assert reason.startswith(f"{error}: "), (case, reason)
    assert site.store_bytes() == before, case


def test_a_round_in_the_clear_is_refused_by_a_site_that_does_not_allow_it(
    tiny_llama: Path, consortium: Path, tmp_path: Path
) -> None:
    site = Site(tiny_llama, consortium, tmp_path, secure=False)
    site.context.node_config["allow-plain-updates"] = False
    before = site.store_bytes()
    code, reason = site.send(_train(_arrays(site.weights)))
    assert code == SITE_REFUSED and reason.startswith("PlainUpdateRefused: "), reason
    assert site.store_bytes() == before


def test_the_ledger_snapshot_would_see_a_charge(tiny_llama: Path, consortium: Path, tmp_path: Path) -> None:
    """The control: a well-formed round does change the ledger file (so the tests above could fail)."""
    site = Site(tiny_llama, consortium, tmp_path, secure=False)
    before = site.store_bytes()
    env = SiteEnv.from_node_config(site.context.node_config)
    prepared = prepare_round(site.config, env, site.weights, run_key=run_key(site.context))
    assert site.store_bytes() == before  # checking charges nothing
    charge_round(site.config, env, prepared, run_key=run_key(site.context))
    after = site.store_bytes()
    [name] = [n for n in before if n.startswith("privacy/") and n.endswith(".json")]
    assert after[name] != before[name]
    assert json.loads(after[name]) != json.loads(before[name])
