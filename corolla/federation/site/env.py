"""What a SuperNode's node config tells its ClientApp, read and checked once per message.

Node config keys (`flower-supernode --node-config`): `data` (the site's training JSONL),
`store` (its private directory: privacy ledger, secure-aggregation round secrets),
`workspace` and `node` (its identity in a consortium workspace; "" for a plaintext dev
swarm), and the optional `max-epsilon` (the site's own cap), `allow-plain-updates` (send
the update in the clear when a run asks for no secure aggregation; default false) and
`keep-updates` (keep what it contributed, in its store).

Importing this module is cheap (no torch): the ClientApp answers keys queries and unmask
messages without the ML stack.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from corolla.errors import CorollaError
from corolla.federation.outcomes import SiteMetrics
from corolla.verify.events import AuditEvent

if TYPE_CHECKING:
    from corolla.pki import NodeIdentity

__all__ = ["NodeConfigError", "SiteEnv", "SiteRefused", "SiteResult"]


class NodeConfigError(CorollaError):
    """The SuperNode's node config lacks a key or names a path that is not there."""

    exit_code = 2


class SiteRefused(CorollaError):
    """The site declines this round (its privacy budget would be exceeded, or its cap)."""

    exit_code = 11


@dataclass(frozen=True, kw_only=True, slots=True)
class SiteEnv:
    """A site's environment: its data, its store, its identity."""

    data: Path  # the site's training JSONL
    store: Path  # the site's private directory (privacy ledger, round secrets)
    workspace: Path | None  # the site's workspace (node identity for mTLS to the swarm); None = plaintext
    node: str  # the site's node name in that workspace
    max_epsilon: float | None = None  # the site's own cap (node config `max-epsilon`): refuses more, or no DP
    allow_plain_updates: bool = False  # may send its update in the clear (no secure aggregation)
    keep_updates: bool = False  # keep each contributed update in `<store>/updates/`
    # Loaded once per message from `workspace`/`node` (its keys and the CA it checks peers against).
    identity: NodeIdentity | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object], *, training: bool = True) -> SiteEnv:
        """From a node config: `data` (an existing JSONL file), `store` (a directory, made if
        missing), `workspace` ("" for none, else an existing directory with the node `node`).
        `training=False` (a keys query, an unmask message) does not need the data file: a site
        answers for the round it uploaded even if its records have moved since."""
        values: dict[str, str] = {}
        for key in ("data", "store", "workspace", "node"):
            value = node_config.get(key)
            if not isinstance(value, str):
                raise NodeConfigError(f"node config {key!r} = {value!r}: expected a string (set with --node-config)")
            values[key] = value
        data = Path(values["data"]).expanduser()
        if training and not data.is_file():
            raise NodeConfigError(f"node config 'data' = {values['data']!r}: no such file")
        if not values["store"]:
            raise NodeConfigError("node config 'store' is empty: give the site's private directory")
        store = Path(values["store"]).expanduser()
        store.mkdir(parents=True, exist_ok=True)
        workspace = Path(values["workspace"]).expanduser() if values["workspace"] else None
        if workspace is not None and not workspace.is_dir():
            raise NodeConfigError(f"node config 'workspace' = {values['workspace']!r}: no such directory")
        if workspace is not None and not values["node"]:
            raise NodeConfigError("node config 'node' is empty: name the site's node in its workspace")
        identity = None
        if workspace is not None:
            from corolla.pki import NodeIdentity

            identity = NodeIdentity.load(workspace / "nodes" / values["node"])
        return cls(
            data=data,
            store=store,
            workspace=workspace,
            node=values["node"],
            max_epsilon=_cap(node_config),
            allow_plain_updates=_flag(node_config, "allow-plain-updates"),
            keep_updates=_flag(node_config, "keep-updates"),
            identity=identity,
        )

    @property
    def name(self) -> str:
        """How the site names itself in replies and messages."""
        return self.node or self.data.stem


@dataclass(frozen=True, slots=True)
class SiteResult:
    update: Mapping[str, np.ndarray]  # the site's new weights minus the given ones, float32
    metrics: SiteMetrics
    audit_events: tuple[AuditEvent, ...] | None = None  # the round's spot-check verdicts; None: no orders


def _cap(node_config: Mapping[str, object]) -> float | None:
    """The site's own epsilon cap: runs asking for more, or for no DP, are refused."""
    if "max-epsilon" not in node_config:
        return None
    cap = node_config["max-epsilon"]
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 < float(cap) < math.inf:
        raise NodeConfigError(f"node config 'max-epsilon' = {cap!r}: expected a positive number")
    return float(cap)


def _flag(node_config: Mapping[str, object], key: str) -> bool:
    value = node_config.get(key, False)
    if not isinstance(value, bool):
        raise NodeConfigError(f"node config {key!r} = {value!r}: expected true or false")
    return value
