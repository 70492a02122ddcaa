"""`platform train` with a poisoned server among three replicas of the model's blocks.

Real processes throughout: three `platform serve` replicas (one started with
`--inject-fault noise:1.0`, which adds noise to every output), a SuperLink and three
SuperNodes, secure aggregation, DP off (so that the two runs differ only by the poison).
The poisoned server must be quarantined and leave routing, the final adapter must score
close to a clean run's, and `platform audit report` must name the server with its evidence.

About 8 minutes on 2 cores: `slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corolla.pki import NodeIdentity

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]


def _train(tiny_llama: Path, workspace: Path, *extra: str) -> tuple[dict, str]:
    out = workspace / "out"
    args = [
        sys.executable, "-m", "corolla", "train", "--adapter", "lora", "--dp-epsilon", "off",
        "--model", str(tiny_llama), "--rounds", "2", "--steps-per-round", "4", "--batch-size", "32",
        "--local-servers", "3", "--replicas", "3", "--audit-rate", "0.5", "--seed", "3",
        "--workspace", str(workspace), "--out-dir", str(out), "--round-timeout", "400", *extra,
    ]  # fmt: skip
    env = dict(os.environ, COROLLA_WORKSPACE=str(workspace))
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), result.stdout


def test_a_poisoned_replica_is_quarantined_and_training_stays_close_to_clean(tiny_llama: Path, tmp_path: Path) -> None:
    clean, _ = _train(tiny_llama, tmp_path / "clean")
    assert clean["verify"]["quarantined"] == []  # honest replicas: nobody flagged
    assert clean["verify"]["audits"] > 10

    poisoned, stdout = _train(tiny_llama, tmp_path / "poisoned", "--inject-fault", "0=noise:1.0")
    consortium = tmp_path / "poisoned" / "train-local" / "consortium"
    servers = sorted(p.name for p in (consortium / "nodes").iterdir() if p.name.startswith("server"))
    bad = NodeIdentity.load(consortium / "nodes" / servers[0]).node_id
    assert poisoned["verify"]["quarantined"] == [bad]
    assert "QUARANTINED: " + bad[:16] in stdout

    # Close to the clean run: the poisoned steps before the quarantine barely move the result.
    clean_loss, poisoned_loss = clean["final"]["loss"], poisoned["final"]["loss"]
    initial = clean["initial"]["loss"]
    assert poisoned_loss < initial - 0.5 * (initial - clean_loss), (clean_loss, poisoned_loss, initial)
    assert abs(poisoned_loss - clean_loss) <= 0.15 * clean_loss, (clean_loss, poisoned_loss)

    # Left routing: after the quarantine every audited computation went to the honest replicas.
    ws = tmp_path / "poisoned"
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "corolla", "audit", "report", "--workspace", str(ws), "--out", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(report.read_text())
    text = report.read_text()
    assert bad in text
    [quarantine] = data["quarantines"]
    assert quarantine["subject"]["node_id"] == bad
    for audit in quarantine["evidence"]:  # the refereed audits that convicted it, with their hashes
        as_primary = audit["subject"]["node_id"] == bad and audit["verdict"] == "fail"
        as_check = (audit["blamed"] or {}).get("node_id") == bad  # it was the check; the referee sided with the primary
        assert as_primary or as_check, audit
        assert audit["referee"] is not None and bad in audit["disagreeing"]
        assert len(audit["input_sha256"]) == 64
    quarantined_at = quarantine["seq"]
    with_primary_bad = [a for a in _audits(ws) if a["seq"] > quarantined_at and a["event"]["primary"]["node_id"] == bad]
    assert with_primary_bad == []

    verify = subprocess.run(
        [sys.executable, "-m", "corolla", "audit", "verify", "--workspace", str(ws)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verify.returncode == 0 and verify.stdout.startswith("ok: "), verify.stdout + verify.stderr


def _audits(workspace: Path) -> list[dict]:
    from corolla.verify.ledger import Ledger
    from corolla.verify.ledger_paths import default_ledger_url

    with Ledger.open(default_ledger_url(workspace)) as ledger:
        return [
            {"seq": s.seq, "event": s.event.model_dump(mode="json")} for s in ledger.events() if s.event.kind == "audit"
        ]
