"""The ClientApp's body (`handle_train`) and the message records, without Flower processes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from corolla.errors import CorollaError
from corolla.federation.messages import (
    METRICS,
    ROUND,
    SERVER_ROUND,
    SITE_CRASHED,
    SITE_FAILED,
    SITE_REFUSED,
    UPDATE,
    VERIFY,
    WEIGHTS,
    RecordError,
    from_array_record,
    from_metrics_record,
    read_error,
    site_error,
    to_array_record,
    to_metrics_record,
)
from corolla.federation.outcomes import SiteMetrics
from corolla.federation.site.env import NodeConfigError, SiteEnv, SiteResult
from corolla.federation.site.handlers import handle_train
from corolla.training.config import TrainConfig

RUN_ID = 42  # the Flower run of the messages (conftest.task_identity)

WEIGHTS_SENT = {
    "base.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
    "base.q_proj.lora_B.weight": np.zeros(4, np.float32),
}


# --- arrays across the wire ----------------------------------------------------------------


def _wire(record: RecordDict) -> RecordDict:
    """`record` serialised and rebuilt as Flower does between processes."""
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(record).items()}
    rebuilt = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(rebuilt, RecordDict)
    return rebuilt


_names = st.text(min_size=0, max_size=30)  # any Unicode, even "" and dots
_array = hnp.arrays(
    st.sampled_from([np.float16, np.float32, np.float64]),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    elements=st.floats(-1e4, 1e4, width=16),
)


@settings(max_examples=60, deadline=None)
@given(arrays=st.dictionaries(_names, _array, max_size=6))
def test_arrays_cross_the_wire_as_float32_with_their_names(arrays: dict[str, np.ndarray]) -> None:
    back = from_array_record(_wire(RecordDict({WEIGHTS: to_array_record(arrays)}))[WEIGHTS], like=arrays)
    assert list(back) == list(arrays)  # names exactly, in order
    for name, array in arrays.items():
        assert back[name].dtype == np.float32
        assert back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array.astype(np.float32))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"w": np.arange(3)}, "dtype int64; expected floating point"),
        ({"w": np.array([1.0, np.inf], np.float32)}, "NaN or infinite"),
    ],
)
def test_arrays_that_cannot_be_sent_are_named(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(RecordError, match=message):
        to_array_record(arrays)


def test_received_arrays_are_checked_against_what_was_sent() -> None:
    record = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)), "extra": Array(np.zeros(1, np.float32))})
    with pytest.raises(RecordError, match=r"missing \['v'\], unexpected \['extra'\]"):
        from_array_record(record, like={"w": np.zeros((2, 2)), "v": np.zeros(1)})
    with pytest.raises(RecordError, match=r"'w' has shape \(2, 2\); expected \(4,\)"):
        from_array_record(ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))}), like={"w": np.zeros(4)})
    with pytest.raises(RecordError, match="expected an ArrayRecord"):
        from_array_record(ConfigRecord({"w": 1}))  # type: ignore[arg-type]


def test_metrics_keep_scalars_and_refuse_the_rest() -> None:
    metrics = {"loss": np.float32(0.5), "steps": np.int64(3), "site": "site-0", "dp": True}
    assert from_metrics_record(to_metrics_record(metrics)) == {"loss": 0.5, "steps": 3, "site": "site-0", "dp": True}
    with pytest.raises(RecordError, match="'grads'"):
        to_metrics_record({"grads": [1.0, 2.0]})
    with pytest.raises(RecordError, match="not finite"):
        to_metrics_record({"loss": float("nan")})


def test_site_errors_name_the_site_and_flower_errors_keep_their_text() -> None:
    refused = read_error(site_error(SITE_REFUSED, site="site-2", exc=CorollaError("budget of 3.0 spent")))
    assert (refused.outcome, refused.site, refused.reason) == ("refused", "site-2", "CorollaError: budget of 3.0 spent")
    offline = read_error(Error(code=5, reason="Error: Node Unavailable"))
    assert (offline.outcome, offline.site, offline.reason) == ("offline", None, "Error: Node Unavailable")
    assert read_error(Error(code=4, reason="expired")).outcome == "missing"
    assert read_error(Error(code=2, reason="<class 'ValueError'>:<'x'>")).outcome == "failed"
    assert read_error(Error(code=SITE_FAILED, reason="not JSON")).reason == "not JSON"


# --- handle_train ----------------------------------------------------------------------------


class Refused(CorollaError):
    pass


@dataclass
class Call:
    config: TrainConfig
    env: SiteEnv
    weights: dict[str, np.ndarray]
    server_round: int
    run_key: str


def _message(weights: dict[str, np.ndarray] = WEIGHTS_SENT, server_round: int = 3) -> Message:
    content = RecordDict({WEIGHTS: to_array_record(weights), ROUND: ConfigRecord({SERVER_ROUND: server_round})})
    message = Message(content, dst_node_id=9, message_type=MessageType.TRAIN, group_id=str(server_round))
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _context(tmp_path: Path, *, secure_agg: bool = False, **node_config: Any) -> Context:
    """A site in a run without secure aggregation that allows plain updates (unless told otherwise)."""
    data = tmp_path / "site.jsonl"
    data.write_text('{"text": "x"}\n')
    defaults = {
        "data": str(data),
        "store": str(tmp_path / "store"),
        "workspace": "",
        "node": "site-4",
        "allow-plain-updates": True,
    }
    run_config = TrainConfig(model="m", out_dir="o", rounds=3, dp_epsilon=None, secure_agg=secure_agg).to_run_config()
    node = {**defaults, **node_config}
    return Context(run_id=42, node_id=9, node_config=node, state=RecordDict(), run_config=run_config)


def _site(calls: list[Call], result: SiteResult | Exception) -> Any:
    def site_round(
        config: TrainConfig,
        env: SiteEnv,
        weights: dict[str, np.ndarray],
        *,
        server_round: int,
        run_key: str,
        orders: Any,
    ) -> SiteResult:
        calls.append(Call(config, env, weights, server_round, run_key))
        if isinstance(result, Exception):
            raise result
        return result

    return site_round


def _handle(msg: Message, context: Context, site_round: Any) -> Message:
    return handle_train(msg, context, site_round, refusals=(Refused,))


def test_a_round_replies_with_the_update_and_metrics(tmp_path: Path) -> None:
    calls: list[Call] = []
    update = {name: np.full(w.shape, 0.25) for name, w in WEIGHTS_SENT.items()}  # float64: sent as float32
    msg = _message()
    reply = _handle(msg, _context(tmp_path), _site(calls, SiteResult(update, SiteMetrics(loss=1.5, epsilon=0.7))))

    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    back = from_array_record(reply.content[UPDATE], like=WEIGHTS_SENT)
    assert all(np.all(v == np.float32(0.25)) for v in back.values())
    assert from_metrics_record(reply.content[METRICS]) == {"loss": 1.5, "epsilon": 0.7, "site": "site-4"}
    [call] = calls
    assert call.server_round == 3 and call.run_key == "flower-run-42"
    assert call.config.rounds == 3 and call.config.dp_epsilon is None
    assert call.env == SiteEnv(
        data=tmp_path / "site.jsonl",
        store=tmp_path / "store",
        workspace=None,
        node="site-4",
        allow_plain_updates=True,  # the node config of `_context`
    )
    assert (tmp_path / "store").is_dir()
    assert list(call.weights) == list(WEIGHTS_SENT)
    assert all(np.array_equal(call.weights[k], WEIGHTS_SENT[k]) for k in WEIGHTS_SENT)


@pytest.mark.parametrize(
    ("raised", "code", "reason"),
    [
        (Refused("privacy budget exhausted"), SITE_REFUSED, "Refused: privacy budget exhausted"),
        (CorollaError("bad record on line 3"), SITE_FAILED, "CorollaError: bad record on line 3"),
        (ZeroDivisionError("division by zero"), SITE_CRASHED, "ZeroDivisionError: division by zero"),
    ],
)
def test_a_site_that_cannot_train_replies_with_why(tmp_path: Path, raised: Exception, code: int, reason: str) -> None:
    reply = _handle(_message(), _context(tmp_path), _site([], raised))

    assert reply.has_error()
    assert reply.error.code == code
    assert json.loads(reply.error.reason or "") == {
        "site": "site-4",
        "error": type(raised).__name__,
        "reason": str(raised),
    }
    assert read_error(reply.error).reason == reason


def test_a_site_sends_no_plain_update_unless_its_node_config_allows_it(tmp_path: Path) -> None:
    calls: list[Call] = []
    update = {name: np.full(w.shape, 0.25) for name, w in WEIGHTS_SENT.items()}
    reply = _handle(
        _message(),
        _context(tmp_path, **{"allow-plain-updates": False}),
        _site(calls, SiteResult(update, SiteMetrics())),
    )
    assert reply.error.code == SITE_REFUSED
    assert "does not set allow-plain-updates = true" in (reply.error.reason or "")
    assert calls == []  # refused before training: no privacy budget spent

    reply = _handle(
        _message(),
        _context(tmp_path, **{"allow-plain-updates": "yes"}),
        _site(calls, SiteResult(update, SiteMetrics())),
    )
    assert reply.error.code == SITE_FAILED and "expected true or false" in (reply.error.reason or "")


def test_a_secure_run_without_an_announcement_is_refused_before_training(tmp_path: Path) -> None:
    calls: list[Call] = []
    update = {name: np.full(w.shape, 0.25) for name, w in WEIGHTS_SENT.items()}
    reply = _handle(_message(), _context(tmp_path, secure_agg=True), _site(calls, SiteResult(update, SiteMetrics())))
    assert reply.error.code == SITE_FAILED
    assert "carries no announcement" in (reply.error.reason or "")
    assert calls == []


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"base.q_proj.lora_A.weight": np.zeros((2, 4))}, r"missing \['base.q_proj.lora_B.weight'\]"),
        ({"base.q_proj.lora_A.weight": np.zeros((4, 2)), "base.q_proj.lora_B.weight": np.zeros(4)}, "has shape"),
        ({"base.q_proj.lora_A.weight": np.zeros((2, 4), int), "base.q_proj.lora_B.weight": np.zeros(4)}, "dtype"),
    ],
)
def test_an_update_that_does_not_fit_the_weights_is_a_failure(
    tmp_path: Path, update: dict[str, np.ndarray], message: str
) -> None:
    reply = _handle(_message(), _context(tmp_path), _site([], SiteResult(update, SiteMetrics())))

    assert reply.error.code == SITE_FAILED
    assert "does not fit the weights it was sent" in (reply.error.reason or "")
    assert read_error(reply.error).reason.split(": ", 1)[0] == "RecordError"
    assert re.search(message, reply.error.reason or "")


def test_the_coordinators_tolerance_table_reaches_the_site_or_is_refused_before_training(tmp_path: Path) -> None:
    """The table crosses the wire in the train message's verify record; a malformed one is a
    failure that says why, before any training (no privacy budget spent)."""
    from corolla.verify.tolerance import load_table

    table = load_table()
    update = {name: np.full(w.shape, 0.25) for name, w in WEIGHTS_SENT.items()}
    seen: list[Any] = []

    def site_round(
        config: TrainConfig, env: SiteEnv, weights: Any, *, server_round: int, run_key: str, orders: Any
    ) -> SiteResult:
        seen.append(orders)
        return SiteResult(update, SiteMetrics())

    for text in (table.model_dump_json(), '{"format": "corolla-tolerances/2"}'):
        msg = _message()
        msg.content[VERIFY] = ConfigRecord({"rate": 0.1, "quarantine": [], "tolerances": text})
        msg = Message(_wire(msg.content), dst_node_id=9, message_type=MessageType.TRAIN, group_id="3")
        msg.metadata.__dict__["_message_id"] = msg.object_id
        reply = _handle(msg, _context(tmp_path), site_round)
        if text == table.model_dump_json():
            assert not reply.has_error() and len(seen) == 1
            assert seen[0].rate == 0.1 and seen[0].tolerances == table
        else:
            assert reply.error.code == SITE_FAILED and len(seen) == 1
            reason = read_error(reply.error).reason
            assert reason.startswith("RecordError: refusing the train message: the coordinator's tolerance table is ")
            assert "not a valid tolerance table (1 error; first: models: Field required)" in reason


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"data": "/nonexistent/site.jsonl"}, "node config 'data' = '/nonexistent/site.jsonl': no such file"),
        ({"store": ""}, "node config 'store' is empty"),
        ({"workspace": "/nonexistent-ws"}, "no such directory"),
        ({"node": 3}, "node config 'node' = 3: expected a string"),
    ],
)
def test_a_bad_node_config_is_a_failure_that_says_what_to_fix(
    tmp_path: Path, node_config: dict[str, Any], message: str
) -> None:
    calls: list[Call] = []
    reply = _handle(_message(), _context(tmp_path, **node_config), _site(calls, SiteResult({}, SiteMetrics())))

    assert reply.error.code == SITE_FAILED
    assert message in (reply.error.reason or "")
    assert calls == []


def test_site_env_fields_from_node_config(tmp_path: Path) -> None:
    from corolla.pki import NodeIdentity
    from corolla.platform.launch.federation import local_consortium

    workspace = local_consortium(tmp_path / "ws", servers=0, sites=1).workspace  # the env loads the node's identity
    data = tmp_path / "d.jsonl"
    data.touch()
    node_config = {"data": str(data), "store": str(tmp_path / "s"), "workspace": str(workspace), "node": "site-0"}
    env = SiteEnv.from_node_config(node_config)
    assert env == SiteEnv(data=data, store=tmp_path / "s", workspace=workspace, node="site-0")
    assert env.identity is not None
    assert env.identity.node_id == NodeIdentity.load(workspace / "nodes" / "site-0").node_id


def test_node_config_may_cap_the_sites_epsilon(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    base = {"data": str(data), "store": str(tmp_path / "s"), "workspace": "", "node": "x"}
    assert SiteEnv.from_node_config(base).max_epsilon is None
    assert SiteEnv.from_node_config({**base, "max-epsilon": 2}).max_epsilon == 2.0
    for bad in (0, -1.0, "3", True, float("inf")):
        with pytest.raises(NodeConfigError, match="max-epsilon"):
            SiteEnv.from_node_config({**base, "max-epsilon": bad})
