"""The launcher without processes: data for a local run, following a run through a fake
Control API, the summary, and the local consortium's identities."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from corolla.federation.progress import LOG_PREFIX, PROGRESS_FILE
from corolla.pki import NodeIdentity, Role
from corolla.platform.flower import RunFailed, RunResult, RunStatus
from corolla.platform.launch.federation import COORDINATOR, local_consortium
from corolla.platform.launch.train_run import (
    LocalConsortiumRun,
    TrainLaunchError,
    follow_run,
    prepare_data,
    run_summary,
)
from corolla.training.config import TrainConfig
from corolla.training.data import load_jsonl

# Whole events as the ServerApp writes them (`outcomes.StartEvent` etc.): a line that is not one is skipped.
START = {"event": "start", "rounds": 1, "dp": False, "secure_agg": False, "aggregation": "mean_update"}
ROUND = {
    "event": "round",
    "round": 1,
    "rounds": 1,
    "seconds": 2.0,
    "kept": False,
    "dp": False,
    "sites": {},
    "eval": {"loss": 1.0},
}
DONE = {"event": "done", "adapter": "/out/adapter", "summary": "/out/summary.json"}


class FakeControl:
    """The Control API as `follow_run` uses it; the "ServerApp" writes `events` as the run goes."""

    def __init__(self, out_dir: Path | None, events: list[dict[str, Any]], status: RunStatus = RunStatus.COMPLETED):
        self.out_dir = out_dir  # None: the ServerApp's files are on another machine
        self.events = events
        self.status = status
        self.started: list[tuple[Path, dict[str, Any]]] = []
        self.stopped: list[int] = []

    def start_run(self, app_dir: Path, *, run_config: dict[str, Any]) -> int:
        self.started.append((app_dir, run_config))
        return 5

    def wait_for_run(self, run_id: int, *, timeout: float) -> RunResult:
        if self.out_dir is not None:
            with (self.out_dir / PROGRESS_FILE).open("w") as file:
                for event in self.events:
                    file.write(json.dumps(event) + "\n")
                    file.flush()
                    time.sleep(0.05)
        log = [LOG_PREFIX + json.dumps(event) for event in self.events]
        return RunResult(run_id=run_id, status=self.status, details="N/A", elapsed=1.0, log="\n".join(log))

    def stop_run(self, run_id: int) -> None:
        self.stopped.append(run_id)


def _config(out_dir: Path) -> TrainConfig:
    return TrainConfig(model="m", out_dir=str(out_dir), rounds=1, dp_epsilon=None)


def test_follow_run_prints_each_event_as_the_server_app_writes_it(tmp_path: Path) -> None:
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({**ROUND, "round": 9}) + "\n")  # a previous run's
    control = FakeControl(tmp_path, [START, ROUND, DONE])
    lines: list[str] = []
    followed = follow_run(control, _config(tmp_path), timeout=10, echo=lines.append)  # type: ignore[arg-type]

    assert [event.to_json() for event in followed.events] == [START, ROUND, DONE]
    assert lines == [
        "training: 1 rounds, DP OFF (no privacy), aggregated in the clear",
        "round 1/1  held-out loss 1.000  eps: DP OFF  2.0 s",
        "done: adapter /out/adapter  summary /out/summary.json",
    ]
    [(app, run_config)] = control.started
    assert (app / "pyproject.toml").is_file()
    assert run_config == _config(tmp_path).to_run_config()


def test_a_server_app_elsewhere_is_followed_through_the_run_log(tmp_path: Path) -> None:
    control = FakeControl(None, [START, ROUND, DONE])
    lines: list[str] = []
    followed = follow_run(control, _config(tmp_path), timeout=10, echo=lines.append)  # type: ignore[arg-type]

    assert [event.to_json() for event in followed.events] == [START, ROUND, DONE] and len(lines) == 3
    assert run_summary(_config(tmp_path), followed) == {"rounds": [ROUND], "adapter": "/out/adapter", "run_id": 5}


def test_a_failed_run_raises(tmp_path: Path) -> None:
    control = FakeControl(tmp_path, [START], status=RunStatus.FAILED)
    with pytest.raises(RunFailed, match="run 5 finished failed"):
        follow_run(control, _config(tmp_path), timeout=10, echo=lambda _: None)  # type: ignore[arg-type]


def test_an_interrupt_stops_the_run(tmp_path: Path) -> None:
    control = FakeControl(tmp_path, [START, ROUND, DONE])

    def interrupt(line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        follow_run(control, _config(tmp_path), timeout=10, echo=interrupt)  # type: ignore[arg-type]
    assert control.stopped == [5]


def test_the_summary_is_the_coordinators_when_it_is_here(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": [1], "final": {"loss": 0.5}}))
    followed = follow_run(FakeControl(tmp_path, [START, DONE]), _config(tmp_path), timeout=10, echo=lambda _: None)  # type: ignore[arg-type]
    summary = run_summary(_config(tmp_path), followed)
    assert summary == {"rounds": [1], "final": {"loss": 0.5}, "adapter": "/out/adapter", "run_id": 5}


# --- data ------------------------------------------------------------------------------------


def test_synthetic_data_is_written_per_site_with_a_test_split(tmp_path: Path) -> None:
    sites, test = prepare_data(tmp_path / "data", sites=3, seed=1, records_per_site=20, test_records=12)

    assert [p.name for p in sites] == ["site-0.jsonl", "site-1.jsonl", "site-2.jsonl"]
    assert all(len(load_jsonl(p)) == 20 for p in sites)
    assert len(load_jsonl(test)) == 12 and test.name == "test.jsonl"
    again, _ = prepare_data(tmp_path / "again", sites=3, seed=1, records_per_site=20, test_records=12)
    assert [p.read_text() for p in again] == [p.read_text() for p in sites]  # the seed decides


def test_given_data_is_a_directory_or_files_with_a_test_set(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl", "test.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    sites, test = prepare_data(tmp_path / "unused", sites=0, seed=0, given=[tmp_path])
    assert [p.name for p in sites] == ["a.jsonl", "b.jsonl"] and test == tmp_path / "test.jsonl"

    with pytest.raises(TrainLaunchError, match="give --test-data"):
        prepare_data(tmp_path / "unused", sites=0, seed=0, given=[tmp_path / "a.jsonl"])
    with pytest.raises(TrainLaunchError, match=r"not found: .*nope\.jsonl"):
        prepare_data(tmp_path / "unused", sites=0, seed=0, given=[tmp_path / "nope.jsonl"], test=tmp_path / "a.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainLaunchError, match="no site"):
        prepare_data(tmp_path / "unused", sites=0, seed=0, given=[tmp_path / "empty"])


# --- identities ------------------------------------------------------------------------------


def test_the_local_consortium_has_a_coordinator_the_superlink_can_serve_as(tmp_path: Path) -> None:
    root = tmp_path / "consortium"
    first = local_consortium(root, servers=1, sites=2)
    stale = (root / "nodes" / "site-0" / "node.pem").read_bytes()
    consortium = local_consortium(root, servers=1, sites=2)  # made afresh each run

    assert consortium.sites == ("site-0", "site-1") and consortium.servers == first.servers
    assert (root / "nodes" / "site-0" / "node.pem").read_bytes() != stale
    coordinator = NodeIdentity.load(root / "nodes" / COORDINATOR)
    assert coordinator.role is Role.COORDINATOR
    for name in (*consortium.sites, COORDINATOR):
        assert (root / "nodes" / name / "tls.pem").is_file()
    assert (root / "nodes" / "site-0" / "flower-auth.key").read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")


def test_concurrent_progress_is_read_while_the_run_goes(tmp_path: Path) -> None:
    """The lines arrive while `wait_for_run` is still going, not only at its end."""
    seen_during: list[bool] = []
    control = FakeControl(tmp_path, [START, ROUND, ROUND, DONE])
    waiting = threading.Event()
    original = control.wait_for_run

    def wait(run_id: int, *, timeout: float) -> RunResult:
        waiting.set()
        result = original(run_id, timeout=timeout)
        time.sleep(0.3)
        waiting.clear()
        return result

    control.wait_for_run = wait  # type: ignore[method-assign]
    follow_run(control, _config(tmp_path), timeout=10, echo=lambda _: seen_during.append(waiting.is_set()))  # type: ignore[arg-type]
    assert seen_during and all(seen_during)


def test_sites_known_only_by_node_id_are_printed_by_name(tmp_path: Path) -> None:
    absent = {**ROUND, "sites": {"node-77": {"status": "offline", "reason": "Node Unavailable"}}}
    lines: list[str] = []
    follow_run(
        FakeControl(tmp_path, [absent]),  # type: ignore[arg-type]
        _config(tmp_path),
        timeout=10,
        echo=lines.append,
        aliases={"node-77": "site-1"},
    )
    assert lines == ["round 1/1  held-out loss 1.000  eps: DP OFF  2.0 s  offline: site-1"]


@pytest.mark.parametrize(
    ("servers", "replicas", "rate", "noted"),
    [(2, 1, 0.05, True), (3, 3, 0.05, False), (2, 1, 0.0, False), (6, 3, 0.5, False)],
)
def test_spot_checks_without_replicas_are_called_out(
    tmp_path: Path, servers: int, replicas: int, rate: float, noted: bool
) -> None:
    config = TrainConfig(model="m", out_dir=str(tmp_path / "out"), audit_rate=rate)
    run = LocalConsortiumRun(
        config, root=tmp_path, servers=servers, replicas=replicas, site_data=[tmp_path / "a"], test_data=tmp_path / "t"
    )
    note = run.audit_note()
    assert (note is not None) == noted
    if noted:
        assert note is not None and "no replica" in note and "--replicas 3" in note
