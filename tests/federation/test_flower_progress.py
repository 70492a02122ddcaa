"""Progress events: the lines the launcher prints, reading the file as it grows, the run log."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corolla.federation.outcomes import DoneEvent, RoundEvent, StartEvent
from corolla.federation.progress import (
    LOG_PREFIX,
    ProgressLog,
    events_from_log,
    follow,
    format_event,
    format_round,
)

ROUND = {
    "event": "round",
    "round": 2,
    "rounds": 5,
    "seconds": 12.34,
    "eval": {"loss": 1.2341, "accuracy": 0.4129, "chance": 0.1667},
    "dp": True,
    "kept": False,
    "sites": {
        "site-1": {"status": "ok", "epsilon": 1.2, "loss": 2.0},
        "site-0": {"status": "ok", "epsilon": 1.2},
        "site-2": {"status": "refused", "reason": "BudgetExhaustedError: spent 3.0 of 3.0", "code": 100},
    },
}
START = {"event": "start", "rounds": 5, "dp": False, "secure_agg": False, "aggregation": "mean_update"}


def _round(**changes: Any) -> RoundEvent:
    """`ROUND` with `changes`, as the typed event the coordinator emits."""
    return RoundEvent.model_validate({**ROUND, **changes})


def test_a_round_is_one_line() -> None:
    assert format_round(_round()) == (
        "round 2/5  held-out loss 1.234  acc 0.41 (chance 0.17)  eps site-0 1.2 site-1 1.2 site-2 -  12.3 s"
        "  refused: site-2 (BudgetExhaustedError: spent 3.0 of 3.0)"
    )


def test_dp_off_is_shown_loudly() -> None:
    line = format_round(_round(dp=False))
    assert "eps: DP OFF" in line and "site-0 1.2" not in line
    start = format_event(StartEvent.model_validate(START))
    assert start == "training: 5 rounds, DP OFF (no privacy), aggregated in the clear"
    dp_on = format_event(StartEvent.model_validate({**START, "dp": True, "dp_epsilon": 3.0, "secure_agg": True}))
    assert dp_on == "training: 5 rounds, DP-SGD, epsilon 3.0 per site, secure aggregation"


def test_absent_sites_and_kept_weights_are_named() -> None:
    sites = {
        "site-0": {"status": "missing", "reason": "no reply within 300 s"},
        "node-77": {"status": "offline", "reason": "Error: Node Unavailable " + "x" * 100},
        "site-2": {"status": "failed", "reason": "RecordError: bad update " + "x" * 100},
    }
    line = format_round(_round(sites=sites, kept=True, eval={}))
    assert line.startswith("round 2/5  eps node-77 - site-0 - site-2 -  12.3 s")
    assert re.search(r"  failed: site-2 \(RecordError: bad update x{33}\.\.\.\)  ", line)  # 60 characters at most
    assert "offline: node-77  missing: site-0  " in line  # the reason is always the heartbeat or the timeout
    assert line.endswith("no updates: weights unchanged")


def test_secure_aggregation_dropouts_and_failures_are_named() -> None:
    dropped = format_round(_round(secure_agg={"uploads": 3, "survivors": 3, "dropped": 1}))
    assert dropped.endswith("secure aggregation: 1 dropped, their masks removed")
    failed = format_round(_round(kept=True, secure_agg={"error": "NotEnoughSurvivors: 2 of 3 answered"}))
    assert failed.endswith(
        "secure aggregation failed (NotEnoughSurvivors: 2 of 3 answered)  no updates: weights unchanged"
    )
    assert "secure aggregation" not in format_round(_round(secure_agg={"uploads": 3, "dropped": 0}))


def test_audits_and_quarantined_servers_are_on_the_round_line() -> None:
    line = format_round(_round(verify={"audits": 7, "quarantined": ["12D3KooWQuarantinedServerId"]}))
    assert line.endswith("  audits 7  QUARANTINED: 12D3KooWQuaranti")  # node ids cut to 16 characters
    assert "QUARANTINED" not in format_round(_round(verify={"audits": 0, "quarantined": []}))


def test_the_log_appends_flushed_lines_and_echoes_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "progress.jsonl").write_text('{"event": "old run"}\n')
    log = ProgressLog.in_dir(tmp_path)
    log.emit(StartEvent(rounds=1, dp=True, dp_epsilon=1.0, secure_agg=False, aggregation="mean_update"))
    lines = (tmp_path / "progress.jsonl").read_text().splitlines()  # readable before close
    log.close()

    assert len(lines) == 1 and json.loads(lines[0])["event"] == "start"  # a new run starts the file afresh
    out = capsys.readouterr().out
    assert "training: 1 rounds, DP-SGD" in out
    assert [event.to_json() for event in events_from_log(out)] == [json.loads(lines[0])]


def _script(path: Path, steps: list[Callable[[], None]]) -> Callable[[], bool]:
    """A `done` callback that performs one step per poll and reports done after the last."""
    calls = iter(steps)

    def done() -> bool:
        step = next(calls, None)
        if step is None:
            return True
        step()
        return False

    return done


ROUND_1 = {"event": "round", "round": 1, "rounds": 2, "seconds": 1.0}
DONE = {"event": "done", "adapter": "/out/adapter", "summary": "/out/summary.json"}


def test_follow_yields_whole_lines_as_they_come(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    start, round_1 = json.dumps(START), json.dumps(ROUND_1)
    second_run = {**START, "rounds": 2}

    def append(text: str) -> Callable[[], None]:
        return lambda: path.open("a").write(text) and None

    steps = [
        lambda: None,  # the file does not exist yet
        append(start + "\n" + round_1[:20]),  # half a line
        append(round_1[20:] + '\nnot json\n{"event": "round", "round": 1}\n'),  # not events: skipped
        lambda: path.write_text(json.dumps(second_run) + "\n"),  # truncated: a new run
        append(json.dumps(DONE) + "\n"),  # written just before the run ends: still read
    ]
    events = list(follow(path, done=_script(path, steps), poll=0.001))

    assert events == [
        StartEvent.model_validate(START),
        RoundEvent.model_validate(ROUND_1),
        StartEvent.model_validate(second_run),
        DoneEvent.model_validate(DONE),
    ]


def test_events_are_found_in_a_run_log() -> None:
    log = "\n".join(
        [
            "INFO :      Starting Flower ServerApp",
            "round 1/1  held-out loss 1.000",
            LOG_PREFIX + json.dumps(ROUND_1),
            "2026-01-01 " + LOG_PREFIX + json.dumps(DONE),
            LOG_PREFIX + "{broken",
        ]
    )
    assert events_from_log(log) == [RoundEvent.model_validate(ROUND_1), DoneEvent.model_validate(DONE)]
