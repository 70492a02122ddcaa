"""Progress events: the lines the launcher prints, reading the file as it grows, the run log."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corolla.federation.outcomes import DoneEvent, EvalEvent, RoundEvent, RoundStartEvent, StartEvent, StepEvent
from corolla.federation.progress import (
    LOG_PREFIX,
    ProgressLog,
    SiteProgress,
    events_from_log,
    follow,
    format_event,
    format_round,
)
from corolla.federation.view import ProgressView

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


# --- watching a run: bars on a terminal, throttled lines elsewhere ----------------------------


def _eval(done: int, total: int = 200, server_round: int = 0) -> EvalEvent:
    return EvalEvent(round=server_round, rounds=3, done=done, total=total, seconds=float(done))


def _step(site: str, step: int, server_round: int = 1) -> StepEvent:
    return StepEvent(site=site, round=server_round, step=step, steps=4, seconds=10.0 * step)


def test_without_a_terminal_progress_is_plain_throttled_lines() -> None:
    """A CI log gets each evaluation's and each site's first, last and every-10-s line, never bars."""
    now = [0.0]
    printed: list[str] = []
    stream = io.StringIO()  # not a terminal
    view = ProgressView(format_event, echo=printed.append, stream=stream, clock=lambda: now[0])
    view.show(StartEvent.model_validate(START))
    for done, at in [(64, 1.0), (128, 5.0), (192, 12.0), (200, 13.0)]:
        now[0] = at
        view.show(_eval(done))
    for step, at in [(1, 20.0), (2, 25.0), (3, 31.0), (4, 32.0)]:
        now[0] = at
        view.show(_step("site-0", step))
    view.show(RoundStartEvent(round=2, rounds=3, nodes=3))
    view.close()
    assert printed == [
        "training: 5 rounds, DP OFF (no privacy), aggregated in the clear",
        "evaluating before training: 64/200 notes  64.0 s",
        "evaluating before training: 192/200 notes  192.0 s",  # 11 s after the first
        "evaluating before training: 200/200 notes  200.0 s",  # the last, always
        "site-0 round 1: step 1/4  10.0 s",
        "site-0 round 1: step 3/4  30.0 s",
        "site-0 round 1: step 4/4  40.0 s",
        "round 2/3: training on 3 sites ...",
    ]
    assert stream.getvalue() == ""  # no bar drawn


def test_on_a_terminal_progress_is_bars_with_the_summaries_above(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    printed: list[str] = []
    with ProgressView(format_event, echo=printed.append, bars=True, stream=stream) as view:
        view.show(StartEvent.model_validate({**START, "rounds": 3}))
        view.show(_eval(64))
        view.show(_eval(200))
        view.show(RoundStartEvent(round=1, rounds=3, nodes=2))
        view.show(_step("site-0", 2))
        view.show(_step("site-1", 1))
        view.show(_round(round=1, rounds=3))
    bars = stream.getvalue()
    assert "rounds" in bars and "1/3" in bars
    assert "baseline eval" in bars and "64/200" in bars
    assert "site-0 round 1" in bars and "2/4" in bars and "site-1 round 1" in bars
    out = capsys.readouterr().out  # the one-line summaries go above the bars, on stdout
    assert "training: 3 rounds" in out and "round 1/3  held-out loss 1.234" in out
    assert printed == []  # nothing through the plain-line path


def test_a_site_appends_its_steps_to_its_own_progress_file(tmp_path: Path) -> None:
    for server_round in (1, 2):
        steps = SiteProgress(tmp_path, site="site-0", server_round=server_round, steps=2, clock=lambda: 0.0)
        steps.step(1)
        steps.step(2)
        steps.close()
    events = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [(e["event"], e["round"], e["step"], e["steps"]) for e in events] == [
        ("step", r, k, 2) for r in (1, 2) for k in (1, 2)
    ]


def test_follow_reads_several_files_in_turn(tmp_path: Path) -> None:
    coordinator, site = tmp_path / "progress.jsonl", tmp_path / "site-0" / "progress.jsonl"
    site.parent.mkdir()
    coordinator.write_text(json.dumps(START) + "\n")
    site.write_text(json.dumps(_step("site-0", 1).to_json()) + "\n")
    events = list(follow([coordinator, site], done=lambda: True, poll=0.001))
    assert events == [StartEvent.model_validate(START), _step("site-0", 1)]
