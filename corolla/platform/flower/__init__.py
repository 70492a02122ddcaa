"""Flower deployment with the consortium's identities: a SuperLink with TLS and SuperNode
authentication, SuperNodes that present enrolled keys, and runs submitted offline.

The processes are real (`flower-superlink`, `flower-supernode`, the `flwr` CLI of flwr 1.42);
keys and certificates are input paths issued by the consortium PKI. See
`docs/federation_deployment.md`.
"""

from corolla.platform.flower.config import ServerTls, SuperLinkConfig, SuperLinkConnection, SuperNodeConfig
from corolla.platform.flower.control import (
    ControlClient,
    RunResult,
    RunStatus,
    SuperNodeInfo,
    SuperNodeStatus,
)
from corolla.platform.flower.errors import (
    ControlError,
    FederationError,
    FederationTimeout,
    ProcessFailed,
    RunFailed,
)
from corolla.platform.flower.superlink import SuperLink
from corolla.platform.flower.supernode import SuperNode

__all__ = [
    "ControlClient",
    "ControlError",
    "FederationError",
    "FederationTimeout",
    "ProcessFailed",
    "RunFailed",
    "RunResult",
    "RunStatus",
    "ServerTls",
    "SuperLink",
    "SuperLinkConfig",
    "SuperLinkConnection",
    "SuperNode",
    "SuperNodeConfig",
    "SuperNodeInfo",
    "SuperNodeStatus",
]
