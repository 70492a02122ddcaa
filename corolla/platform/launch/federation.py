"""A Flower federation on this machine with a workspace's identities.

The SuperLink serves the coordinator's TLS certificate (issued by the workspace CA for
127.0.0.1) with SuperNode authentication; each site's Flower key is enrolled only after
its certificate checks (`enroll_site`), and its SuperNode gets the node config that tells
its ClientApps where the site's data and private store are.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from corolla.platform.flower import (
    ControlClient,
    FederationError,
    ServerTls,
    SuperLink,
    SuperLinkConfig,
    SuperNode,
    SuperNodeConfig,
)
from corolla.platform.flower.enrolment import enroll_site
from corolla.platform.workspace import LocalConsortium, throwaway_consortium

COORDINATOR = "coordinator"  # the coordinator's node name in a local consortium


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_consortium(root: Path, *, servers: int, sites: int) -> LocalConsortium:
    """A fresh throwaway CA in `root` (replacing any there) with `servers` servers, `sites`
    sites and the coordinator, whose TLS certificate names 127.0.0.1 for the SuperLink."""
    from corolla.pki import ConsortiumCA

    if root.exists():
        shutil.rmtree(root)
    consortium = throwaway_consortium(root, servers=servers, sites=sites)
    ConsortiumCA.open(root).issue(COORDINATOR, "coordinator", hosts=["127.0.0.1", "localhost"])
    return consortium


class LocalFederation:
    """A SuperLink with the coordinator's certificate and one enrolled SuperNode per site.

    `node_configs` maps each site's node name in `workspace` to its SuperNode's node config.
    Logs and Flower state go in `work_dir`.
    """

    def __init__(
        self,
        workspace: Path,
        node_configs: Mapping[str, Mapping[str, bool | int | float | str]],
        *,
        work_dir: Path,
        coordinator: str = COORDINATOR,
    ) -> None:
        self.workspace = Path(workspace)
        self.node_configs = dict(node_configs)
        self.work_dir = Path(work_dir)
        self.coordinator = coordinator
        self.link: SuperLink | None = None
        self.nodes: dict[str, SuperNode] = {}
        self._control: ControlClient | None = None

    @property
    def control(self) -> ControlClient:
        if self._control is None:
            raise FederationError("the local federation is not started")
        return self._control

    def start(self) -> LocalFederation:
        from corolla.pki import NodeIdentity

        coordinator = self.workspace / "nodes" / self.coordinator
        tls = ServerTls(ca_cert=coordinator / "ca.pem", cert=coordinator / "tls.pem", key=coordinator / "tls.key")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.link = SuperLink(SuperLinkConfig(tls=tls, port=_free_port()), work_dir=self.work_dir).start()
            self._control = ControlClient(self.link.connection, work_dir=self.work_dir)
            verifier = NodeIdentity.load(coordinator).verifier()
            for name, node_config in self.node_configs.items():
                node_dir = self.workspace / "nodes" / name
                enroll_site(self._control, verifier, node_dir)
                self.nodes[name] = SuperNode(
                    SuperNodeConfig(
                        superlink=self.link.connection,
                        auth_private_key=node_dir / "flower-auth.key",
                        runtime_port=_free_port(),
                        node_config=node_config,
                        name=name,
                    ),
                    work_dir=self.work_dir,
                )
            with ThreadPoolExecutor(max(len(self.nodes), 1)) as pool:
                list(pool.map(SuperNode.start, self.nodes.values()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        if self.link is not None:
            self.link.stop()

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
