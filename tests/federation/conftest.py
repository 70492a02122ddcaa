"""Fixtures of the federation tests: the process's Flower task identity, a consortium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from corolla.federation.coordinator.audits import CoordinatorAudits
from corolla.platform.launch.federation import local_consortium
from corolla.training.config import TrainConfig


@pytest.fixture(autouse=True)
def task_identity(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Messages read their run and node from the process's task identity, as in a ServerApp
    (run id: the test module's `RUN_ID`)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", getattr(request.module, "RUN_ID", 42))
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    yield


@pytest.fixture(scope="session")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway consortium: CA, coordinator, sites site-0 .. site-3 (no servers)."""
    root = tmp_path_factory.mktemp("consortium")
    local_consortium(root, servers=0, sites=4)
    return root


@pytest.fixture
def audits(tmp_path: Path) -> Iterator[CoordinatorAudits]:
    """The coordinator's spot-check ledger for a run, in `tmp_path` (audit rate 0.05)."""
    config = TrainConfig(
        model="m",
        out_dir=str(tmp_path / "out"),
        audit_rate=0.05,
        ledger=str(tmp_path / "ledger.db"),
        ledger_key=str(tmp_path / "ledger.key"),
    )
    made = CoordinatorAudits.for_config(config)
    assert made is not None
    yield made
    made.close()
