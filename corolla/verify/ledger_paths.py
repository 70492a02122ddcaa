"""Where a workspace keeps its verification ledger and the key that signs its head.

One place for both paths: the training coordinator writes there, `platform audit` and
`platform swarm status` read there.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_ledger_key_path", "default_ledger_path", "default_ledger_url"]


def default_ledger_path(workspace: Path) -> Path:
    """The SQLite file of the workspace's ledger: `<workspace>/ledger/ledger.db`."""
    return workspace / "ledger" / "ledger.db"


def default_ledger_url(workspace: Path) -> str:
    """The workspace's ledger as a URL for `Ledger.open`."""
    return f"sqlite:///{default_ledger_path(workspace).absolute()}"


def default_ledger_key_path(workspace: Path) -> Path:
    """The Ed25519 key that signs the ledger's head: `<workspace>/ledger/ledger.key` (mode 0600)."""
    return workspace / "ledger" / "ledger.key"
