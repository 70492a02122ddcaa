"""Federated rounds on real Flower processes: a SuperLink and four enrolled SuperNodes with a
workspace's identities, running the test app in `fake_app/` (Corolla's `run_rounds` and
`handle_train` around a fake coordinator and fake sites; see its modules), with secure
aggregation as `platform train` runs it: the coordinator sees only masked uploads.

One federation serves the module; the kill test runs last, as it leaves one node dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from corolla.federation.outcomes import ProgressEvent, RoundEvent
from corolla.platform.launch.federation import COORDINATOR, LocalFederation, local_consortium
from corolla.platform.launch.train_run import follow_run
from corolla.training.config import TrainConfig

APP = Path(__file__).parent / "fake_app"
SITES = ("site-0", "site-1", "site-2", "site-3")  # site-i sends updates of i + 1
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # numbers as themselves; JSON strings are TOML basic strings


def _app_with_config(target: Path) -> Path:
    """The fake app with [tool.flwr.app.config] declaring every TrainConfig key."""
    shutil.copytree(APP, target, ignore=shutil.ignore_patterns("__pycache__"))
    defaults = TrainConfig(model="", out_dir="").to_run_config()
    section = "\n[tool.flwr.app.config]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in defaults.items())
    with (target / "pyproject.toml").open("a", encoding="utf-8") as file:
        file.write(section)
    return target


@dataclass(frozen=True)
class Federation:
    local: LocalFederation
    stores: dict[str, Path]
    app: Path
    workspace: Path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("train-fed")
    consortium = local_consortium(root / "ws", servers=0, sites=len(SITES))
    data = root / "data.jsonl"
    data.write_text('{"text": "unused by the fake sites"}\n', encoding="utf-8")
    stores = {name: root / "stores" / name for name in SITES}
    for store in stores.values():
        store.mkdir(parents=True)
    (stores["site-2"] / "refuse-at").write_text("2")
    node_configs = {
        name: {"data": str(data), "store": str(stores[name]), "workspace": str(consortium.workspace), "node": name}
        for name in SITES
    }
    with LocalFederation(consortium.workspace, node_configs, work_dir=root / "logs") as local:
        yield Federation(
            local=local, stores=stores, app=_app_with_config(root / "fake-app"), workspace=consortium.workspace
        )
    assert not any(node.running for node in local.nodes.values())


def _config(federation: Federation, tmp_path: Path, **kwargs: object) -> TrainConfig:
    """Secure aggregation with the workspace's coordinator; updates up to 4 fit the encoding."""
    return TrainConfig(
        model="unused",
        out_dir=str(tmp_path / "out"),
        sites=len(SITES),
        workspace=str(federation.workspace),
        node=COORDINATOR,
        secure_agg_clip=4.0,
        **kwargs,  # type: ignore[arg-type]
    )


def test_rounds_aggregate_updates_and_record_a_refusal(federation: Federation, tmp_path: Path) -> None:
    config = _config(federation, tmp_path, rounds=2, round_timeout=60.0, dp_epsilon=1.0)
    lines: list[str] = []
    started = time.monotonic()
    followed = follow_run(federation.local.control, config, timeout=180, app=federation.app, echo=lines.append)
    print(f"2 rounds on 3 SuperNodes: {time.monotonic() - started:.1f} s")

    rounds = _rounds(followed.events)
    assert [r["aggregated"] for r in rounds] == [4, 3], [(r.get("secure_agg"), r["sites"]) for r in rounds]
    # Secure aggregation: whole numbers are exact in the fixed-point encoding, so the means are too.
    assert rounds[0]["eval"]["accuracy"] == pytest.approx(2.5, abs=1e-6)  # 0 + mean(1, 2, 3, 4)
    assert rounds[1]["eval"]["accuracy"] == pytest.approx(2.5 + 7 / 3, abs=1e-6)  # + mean(1, 2, 4): site-2 refused
    assert {name: info["status"] for name, info in rounds[1]["sites"].items()} == {
        "site-0": "ok",
        "site-1": "ok",
        "site-2": "refused",
        "site-3": "ok",
    }
    assert rounds[0]["secure_agg"] == {"uploads": 4, "survivors": 4, "dropped": 0, "unmask_answers": 4, "threshold": 3}
    assert rounds[0]["sites"]["site-1"]["epsilon"] == 0.5

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [refusal] = summary["refusals"]
    assert refusal["round"] == 2 and refusal["site"] == "site-2" and refusal["status"] == "refused"
    assert refusal["reason"] == "FakeRefused: privacy budget exhausted (fake)"
    assert summary["missing"] == [] and summary["failures"] == []
    assert summary["sites"]["site-2"]["rounds_trained"] == 1
    weights = np.load(tmp_path / "out" / "adapter" / "weights.npz")
    assert all(np.allclose(weights[name], 2.5 + 7 / 3, rtol=0, atol=1e-6) for name in weights.files)

    # Every site filed the run under the same key, from the SuperNode's context.
    keys = {(federation.stores[name] / "round-1").read_text() for name in SITES}
    assert keys == {f"flower-run-{followed.result.run_id}"}

    # Progress lines (not a terminal: plain) between the summaries: a round starting, the scoring.
    assert lines.count("round 1/2: training on 4 sites ...") == 1
    assert sum(line.startswith("evaluating before training: 1/1 notes  ") for line in lines) == 1
    lines = [line for line in lines if not line.startswith("evaluating ") and not line.endswith(" sites ...")]
    assert lines[0].startswith("training: 2 rounds, DP-SGD, epsilon 1.0 per site")
    assert "secure aggregation" in lines[0]
    assert lines[1] == "before training: held-out loss 10.000  acc 0.00 (chance 0.25)"
    assert lines[2].startswith(
        "round 1/2  held-out loss 7.500  acc 2.50 (chance 0.25)  eps site-0 0.5 site-1 0.5 site-2 0.5 site-3 0.5  "
    )
    assert "eps site-0 1 site-1 1 site-2 - site-3 1" in lines[3]
    assert "refused: site-2 (FakeRefused: privacy budget exhausted (fake))" in lines[3]


def _rounds(events: list[ProgressEvent]) -> list[dict[str, Any]]:
    """The round events as the JSON objects of progress.jsonl."""
    return [e.to_json() for e in events if isinstance(e, RoundEvent)]


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process under it (its SuperExec and ClientApps): a crashed machine."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def test_a_site_killed_mid_round_is_reported_offline_and_the_round_completes(
    federation: Federation, tmp_path: Path
) -> None:
    for store in federation.stores.values():
        for stale in store.glob("round-*"):
            stale.unlink()
    (federation.stores["site-1"] / "sleep").touch()
    victim = federation.local.nodes["site-1"]
    killed_at: list[float] = []

    def kill_when_training() -> None:
        deadline = time.monotonic() + 120
        while not (federation.stores["site-1"] / "round-1").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        _kill_tree(victim._process.pid)  # type: ignore[arg-type]  # the test reaches into the process on purpose
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    config = _config(federation, tmp_path, rounds=1, round_timeout=150.0)  # longer than Flower's heartbeat window
    followed = follow_run(federation.local.control, config, timeout=220, app=federation.app, echo=lambda _: None)
    finished = time.monotonic()
    killer.join(timeout=5)

    assert killed_at, "site-1 never started its round"
    print(f"round completed {finished - killed_at[0]:.1f} s after the kill")
    [round_one] = _rounds(followed.events)
    # Killed after the key stage, before its masked upload: the three others' sum is unmasked.
    assert round_one["aggregated"] == 3, round_one
    assert round_one["secure_agg"]["dropped"] == 1
    assert round_one["eval"]["accuracy"] == pytest.approx(8 / 3, abs=1e-6)  # mean(1, 3, 4)
    dead = f"node-{victim.node_id}"  # it never replied in this run, so only its node id is known
    assert round_one["sites"][dead]["status"] == "offline"
    assert round_one["seconds"] < config.round_timeout  # the SuperLink said so; the loop did not wait it out
    # 60 s heartbeat window, a 3 s poll, the unmask stage (one more push and pull, ClientApps starting), the
    # ServerApp saving and exiting; on a loaded 2-core machine the last two took up to ~45 s.
    assert finished - killed_at[0] < 120
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(m["site"], m["status"]) for m in summary["missing"]] == [(dead, "offline")]
