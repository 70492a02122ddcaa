"""The coordinator's loop (`run_rounds`) against a fake Grid and a fake coordinator.

The fake Grid answers each train message as the test says: an update, a site's error, the
SuperLink's "node unavailable", or nothing (the timeout passes). Message ids and
`reply_to` are set as flwr 1.42's HttpGrid and SuperLink set them.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from corolla.federation.coordinator.model import write_summary
from corolla.federation.coordinator.rounds import RoundError, mean_update, run_rounds
from corolla.federation.messages import (
    METRICS,
    ROUND,
    SERVER_ROUND,
    SITE,
    SITE_REFUSED,
    UPDATE,
    WEIGHTS,
    from_array_record,
    site_error,
    to_array_record,
    to_metrics_record,
)
from corolla.federation.outcomes import RunSummary
from corolla.federation.progress import ProgressLog
from corolla.training.config import TrainConfig

RUN_ID = 7  # the Flower run of the messages (conftest.task_identity)

SHAPES = {"a.lora_A": (2, 3), "a.lora_B": (3,)}
Reply = Callable[[Message, int], Message | None]  # (message, round) -> reply, or None for no reply


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeGrid:
    def __init__(self, replies: dict[int, Reply], clock: FakeClock, online: Callable[[float], list[int]] | None = None):
        self.replies = replies
        self.clock = clock
        self.online = online or (lambda now: list(replies))
        self.sent: list[Message] = []
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> list[int]:
        return self.online(self.clock.now)

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        self.timeouts.append(timeout)
        out = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as HttpGrid.push_messages
            self.sent.append(message)
            server_round = int(message.content[ROUND][SERVER_ROUND])
            reply = self.replies[message.metadata.dst_node_id](message, server_round)
            if reply is not None:
                out.append(reply)
        return out


def update_of(value: float, *, site: str | None = None, **metrics: Any) -> Reply:
    def reply(message: Message, server_round: int) -> Message:
        weights = from_array_record(message.content[WEIGHTS])
        update = {name: np.full(w.shape, value, dtype=np.float32) for name, w in weights.items()}
        extra = {SITE: site} if site else {}
        return Message(
            RecordDict({UPDATE: to_array_record(update), METRICS: to_metrics_record({**metrics, **extra})}),
            reply_to=message,
        )

    return reply


def refuses(site: str, *, in_rounds: tuple[int, ...] = (1, 2, 3), otherwise: Reply | None = None) -> Reply:
    def reply(message: Message, server_round: int) -> Message | None:
        if server_round in in_rounds:
            return Message(site_error(SITE_REFUSED, site=site, exc=RuntimeError("budget spent")), reply_to=message)
        return otherwise(message, server_round) if otherwise else None

    return reply


def flower_error(code: int, reason: str) -> Reply:
    return lambda message, _: Message(Error(code=code, reason=reason), reply_to=message)


def silent(message: Message, server_round: int) -> None:
    return None


class FakeCoordinator:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.evaluated: list[dict[str, np.ndarray]] = []
        self.saved: tuple[dict[str, np.ndarray], RunSummary] | None = None

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}

    def evaluate(
        self, weights: dict[str, np.ndarray], progress: Callable[[int, int], None] | None = None
    ) -> dict[str, float]:
        self.evaluated.append(weights)
        if progress is not None:  # two batches of held-out records
            progress(2, 4)
            progress(4, 4)
        return {"loss": 1.0, "accuracy": float(weights["a.lora_B"][0]), "chance": 0.25}

    def save(self, weights: dict[str, np.ndarray], summary: RunSummary) -> Path:
        self.saved = (weights, summary)
        return self.out_dir / "adapter"


def _run(
    tmp_path: Path, replies: dict[int, Reply], *, online: Callable[[float], list[int]] | None = None, **config: Any
) -> tuple[dict[str, Any], FakeGrid, FakeCoordinator, list[dict[str, Any]]]:
    settings_ = {
        "model": "m",
        "out_dir": str(tmp_path),
        "rounds": 2,
        "round_timeout": 30.0,
        "secure_agg": False,
        **config,
    }
    clock = FakeClock()
    grid = FakeGrid(replies, clock, online)
    coordinator = FakeCoordinator(tmp_path)
    with ProgressLog.in_dir(tmp_path, echo=False) as progress:
        summary: dict[str, Any] = run_rounds(
            grid,  # type: ignore[arg-type]
            TrainConfig(**settings_),
            coordinator,
            progress=progress,
            clock=clock,
            sleep=clock.sleep,
        ).to_json()
    events = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    return summary, grid, coordinator, events


def test_each_round_adds_the_mean_update(tmp_path: Path) -> None:
    replies = {11: update_of(1.0, site="site-0", epsilon=0.5), 12: update_of(2.0, site="site-1"), 13: update_of(6.0)}
    summary, grid, coordinator, events = _run(tmp_path, replies)

    evaluation = ["eval", "eval"]  # the held-out scoring reports each batch: 2 of 4 records, 4 of 4
    assert [e["event"] for e in events] == [
        "start",
        *evaluation,
        "baseline",
        *(["round_start", *evaluation, "round"] * 2),
        "done",
    ]
    scoring = [(e["round"], e["done"], e["total"]) for e in events if e["event"] == "eval"]
    assert scoring == [(r, done, 4) for r in (0, 1, 2) for done in (2, 4)]
    assert [e["nodes"] for e in events if e["event"] == "round_start"] == [3, 3]
    assert [e["eval"]["accuracy"] for e in _rounds(events)[0:2]] == [3.0, 6.0]
    weights, saved = coordinator.saved  # type: ignore[misc]
    assert all(np.all(w == np.float32(6.0)) and w.dtype == np.float32 for w in weights.values())
    assert saved.to_json() == {k: v for k, v in summary.items() if k != "adapter"}
    assert summary["adapter"] == str(tmp_path / "adapter")
    assert set(summary["sites"]) == {"site-0", "site-1", "node-13"}  # a site that gives no name is its node id
    assert summary["sites"]["site-0"]["epsilon"] == 0.5
    assert summary["sites"]["site-0"]["rounds_trained"] == 2
    assert summary["refusals"] == summary["missing"] == summary["failures"] == []
    assert summary["config"]["rounds"] == 2 and summary["aggregation"] == "mean_update"
    assert not summary["secure_agg"]  # requested, but the plain mean is in the clear: said so

    first = grid.sent[0]
    assert first.metadata.message_type == "train"
    assert first.metadata.group_id == "1"
    assert first.metadata.ttl == 30.0  # a node that comes back late does not train a stale round
    assert {m.metadata.dst_node_id for m in grid.sent} == {11, 12, 13}
    assert grid.timeouts == [30.0, 30.0]
    sent = from_array_record(grid.sent[3].content[WEIGHTS])  # round 2 carries round 1's result
    assert all(np.all(w == np.float32(3.0)) for w in sent.values())


def test_refusals_and_errors_are_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    replies = {
        1: update_of(4.0, site="site-0"),
        2: refuses("site-1", in_rounds=(2,), otherwise=update_of(2.0, site="site-1")),
        3: flower_error(2, "<class 'ZeroDivisionError'>:<'division by zero'>"),
    }
    summary, _, _, events = _run(tmp_path, replies)

    assert [e["aggregated"] for e in _rounds(events)[0:2]] == [2, 1]
    assert [e["eval"]["accuracy"] for e in _rounds(events)[0:2]] == [3.0, 7.0]
    assert _rounds(events)[1]["sites"]["site-1"] == {
        "status": "refused",
        "reason": "RuntimeError: budget spent",
        "code": 100,
    }
    assert [(r["round"], r["site"], r["reason"]) for r in summary["refusals"]] == [
        (2, "site-1", "RuntimeError: budget spent")
    ]
    assert [(f["round"], f["site"], f["code"]) for f in summary["failures"]] == [(1, "node-3", 2), (2, "node-3", 2)]
    assert "division by zero" in summary["failures"][0]["reason"]


def test_unanswered_and_offline_sites_are_recorded_as_absent(tmp_path: Path) -> None:
    node_unavailable = "Error: Node Unavailable — The destination node failed to report a heartbeat"
    replies = {1: update_of(1.0, site="site-0"), 2: silent, 3: flower_error(5, node_unavailable)}
    summary, _, _, events = _run(tmp_path, replies, rounds=1)

    assert _rounds(events)[0]["aggregated"] == 1
    assert _rounds(events)[0]["sites"]["node-2"] == {"status": "missing", "reason": "no reply within 30 s"}
    assert _rounds(events)[0]["sites"]["node-3"]["status"] == "offline"
    assert [(m["site"], m["status"]) for m in summary["missing"]] == [("node-2", "missing"), ("node-3", "offline")]


def test_a_round_without_updates_keeps_the_weights_and_says_so(tmp_path: Path) -> None:
    replies = {1: refuses("site-0"), 2: silent}
    summary, _, coordinator, events = _run(tmp_path, replies)

    assert [(e["aggregated"], e["kept"]) for e in _rounds(events)[0:2]] == [(0, True), (0, True)]
    assert len(coordinator.evaluated) == 3  # the start, then after each round all the same
    weights, _ = coordinator.saved  # type: ignore[misc]
    assert all(np.all(w == 0) for w in weights.values())
    assert len(summary["refusals"]) == 2 and len(summary["missing"]) == 2


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"a.lora_A": np.ones((2, 3), np.float32)}, "missing ['a.lora_B']"),
        ({"a.lora_A": np.ones((3, 2), np.float32), "a.lora_B": np.ones(3, np.float32)}, "has shape (3, 2)"),
        ({"a.lora_A": np.ones((2, 3), np.float64), "a.lora_B": np.ones(3, np.float32)}, "dtype float64"),
        ({"a.lora_A": np.full((2, 3), np.nan, np.float32), "a.lora_B": np.ones(3, np.float32)}, "NaN"),
    ],
)
def test_an_update_that_does_not_fit_is_rejected(tmp_path: Path, bad: dict[str, np.ndarray], reason: str) -> None:
    from flwr.app import Array, ArrayRecord

    def malformed(message: Message, _: int) -> Message:
        record = ArrayRecord({name: Array(value) for name, value in bad.items()})  # bypasses our own checks
        return Message(RecordDict({UPDATE: record, METRICS: ConfigRecord({SITE: "site-x"})}), reply_to=message)

    summary, _, _, events = _run(tmp_path, {1: update_of(1.0), 2: malformed}, rounds=1)

    assert _rounds(events)[0]["aggregated"] == 1
    [failure] = summary["failures"]
    assert failure["status"] == "failed" and failure["reason"].startswith("invalid reply:")
    assert reason in failure["reason"]


def test_the_first_round_waits_for_the_expected_sites(tmp_path: Path) -> None:
    replies = {1: update_of(1.0), 2: update_of(1.0), 3: update_of(1.0)}
    _, grid, _, events = _run(tmp_path, replies, online=lambda now: [1, 2, 3] if now >= 5 else [1], sites=3)

    assert _rounds(events)[0]["nodes"] == 3
    assert {m.metadata.dst_node_id for m in grid.sent[:3]} == {1, 2, 3}


def test_without_the_expected_sites_the_first_round_starts_with_those_online(tmp_path: Path) -> None:
    replies = {1: update_of(1.0), 2: update_of(1.0)}
    _, grid, _, events = _run(tmp_path, replies, online=lambda now: [1], sites=2, rounds=1)

    assert _rounds(events)[0]["nodes"] == 1  # after round_timeout, with the one that came
    assert [m.metadata.dst_node_id for m in grid.sent] == [1]


def test_with_no_site_online_the_round_is_empty(tmp_path: Path) -> None:
    _, grid, coordinator, events = _run(tmp_path, {}, online=lambda now: [], rounds=1)

    assert grid.sent == []
    assert _rounds(events)[0]["nodes"] == 0 and _rounds(events)[0]["kept"]
    assert coordinator.saved is not None


def test_two_nodes_claiming_one_name_are_told_apart(tmp_path: Path) -> None:
    summary, _, _, _ = _run(tmp_path, {1: update_of(1.0, site="site-0"), 2: update_of(1.0, site="site-0")}, rounds=1)

    assert set(summary["sites"]) == {"site-0", "site-0@2"}


def test_a_custom_aggregate_is_used_and_checked(tmp_path: Path) -> None:
    replies = {1: update_of(1.0), 2: update_of(3.0)}
    clock = FakeClock()
    coordinator = FakeCoordinator(tmp_path)
    with ProgressLog.in_dir(tmp_path, echo=False) as progress:
        summary: dict[str, Any] = run_rounds(
            FakeGrid(replies, clock),  # type: ignore[arg-type]
            TrainConfig(model="m", out_dir=str(tmp_path), rounds=1, secure_agg=False),
            coordinator,
            progress=progress,
            aggregate=lambda updates: updates[-1],
            clock=clock,
            sleep=clock.sleep,
        ).to_json()
        assert summary["aggregation"] == "<lambda>"
        assert summary["final"]["accuracy"] == 3.0

        with pytest.raises(RoundError, match="names or shapes"):
            run_rounds(
                FakeGrid(replies, clock),  # type: ignore[arg-type]
                TrainConfig(model="m", out_dir=str(tmp_path), rounds=1, secure_agg=False),
                coordinator,
                progress=progress,
                aggregate=lambda updates: {"a.lora_A": updates[0]["a.lora_A"]},
                clock=clock,
                sleep=clock.sleep,
            )


# --- the plain mean ----------------------------------------------------------------------


_arrays = hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=4), elements=st.floats(-1e3, 1e3, width=32))


@settings(max_examples=50, deadline=None)
@given(base=_arrays, scales=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=5), data=st.data())
def test_mean_update_is_the_uniform_float32_mean(base: np.ndarray, scales: list[float], data: st.DataObject) -> None:
    updates = [{"w": (base * np.float32(s)).astype(np.float32)} for s in scales]
    mean = mean_update(updates)["w"]
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, np.mean([u["w"] for u in updates], axis=0, dtype=np.float64), rtol=1e-6, atol=1e-3)
    shuffled = data.draw(st.permutations(updates))
    np.testing.assert_array_equal(mean_update(list(shuffled))["w"], mean)  # order does not matter


def test_mean_update_refuses_mismatched_updates() -> None:
    with pytest.raises(ValueError, match="at least one"):
        mean_update([])
    with pytest.raises(ValueError, match="names or shapes"):
        mean_update([{"w": np.zeros(2, np.float32)}, {"w": np.zeros(3, np.float32)}])


def _rounds(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "round"]


# --- what a hostile site can send ------------------------------------------------------------


def _raw_update(data: bytes, *, dtype: str = "float32", shape: tuple[int, ...] | None = None) -> Reply:
    """A reply whose update arrays carry `data` as their bytes, declared as `dtype` and `shape`."""

    def reply(message: Message, server_round: int) -> Message:
        arrays = {
            name: Array(dtype=dtype, shape=shape if shape is not None else s, stype="numpy.ndarray", data=data)
            for name, s in SHAPES.items()
        }
        return Message(RecordDict({UPDATE: ArrayRecord(arrays), METRICS: to_metrics_record({})}), reply_to=message)

    return reply


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros(6, np.float32))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (_raw_update(b""), "carries 0 bytes"),
        (_raw_update(_npz() * 40), "cannot be read|does not hold|bytes for shape"),
        (_raw_update(b"\x00" * 200, shape=(10**13,)), "declares shape"),
        (_raw_update(b"\x00" * 200, dtype="float64"), "has dtype float64; expected float32"),
    ],
    ids=["empty", "npz", "a huge declared shape", "float64"],
)
def test_update_bytes_a_site_chose_fail_that_site_not_the_round(tmp_path: Path, reply: Reply, reason: str) -> None:
    summary, _, _, events = _run(tmp_path, {1: update_of(1.0, site="site-0"), 2: reply}, rounds=1)
    [failure] = summary["failures"]
    assert failure["node_id"] == 2 and re.search(reason, failure["reason"]), failure["reason"]
    assert _rounds(events)[0]["aggregated"] == 1  # the honest site's update is in


def test_an_aggregate_that_overflows_the_weights_is_kept_out(tmp_path: Path) -> None:
    _, _, coordinator, events = _run(tmp_path, {1: update_of(3e38), 2: update_of(3e38)}, rounds=2)
    first, second = _rounds(events)
    assert not first["kept"] and second["kept"]  # 3e38 + 3e38 is inf in float32: refused in round 2
    assert coordinator.saved is not None
    assert all(np.all(np.isfinite(w)) for w in coordinator.saved[0].values())


def test_a_site_cannot_take_the_name_of_another_node(tmp_path: Path) -> None:
    _, _, _, events = _run(tmp_path, {1: silent, 2: update_of(1.0, site="node-1")}, rounds=1)
    sites = _rounds(events)[0]["sites"]
    assert sites["node-1"]["status"] == "missing"  # node 1's own outcome is not hidden
    assert sites["node-1@2"]["status"] == "ok"


def test_site_metrics_out_of_range_fail_the_reply(tmp_path: Path) -> None:
    summary, _, _, _ = _run(tmp_path, {1: update_of(1.0, epsilon=-1.0), 2: update_of(1.0, steps=True)}, rounds=1)
    assert sorted(f["node_id"] for f in summary["failures"]) == [1, 2]


def test_summary_json_reads_back_through_its_model(tmp_path: Path) -> None:
    """The file the coordinator writes (`write_summary`) is read back through `RunSummary`, and
    a site without DP has `"epsilon": null`, as before the typed records."""
    summary, _, _, _ = _run(tmp_path, {1: update_of(1.0, site="site-0")}, rounds=1)
    path = write_summary(tmp_path, RunSummary.model_validate(summary))
    data = json.loads(path.read_text())
    assert data["sites"]["site-0"]["epsilon"] is None
    assert RunSummary.model_validate_json(path.read_text()).to_json() == summary
