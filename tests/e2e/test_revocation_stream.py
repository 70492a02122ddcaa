"""Revocation ends an open stream on a real `platform serve` process (issue 13, finding 1).

A site opens an inference stream and steps; the operator revokes it with `platform keys
revoke` (which copies the new CRL into every node directory of the workspace); the server,
re-checking its callers against the CRL while their calls run, ends the stream within
seconds with PERMISSION_DENIED. Another member is still served.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from corolla.inference.client.transport import ServerStub
from corolla.inference.security import TlsConfig
from corolla.pki import ConsortiumCA, NodeIdentity
from corolla.platform.cli import main
from corolla.platform.launch.servers import LocalServers
from tests.revocation import seconds_until_refused

pytestmark = pytest.mark.e2e

HIDDEN = 64


def test_revoking_a_site_ends_its_open_stream_on_a_real_server(tiny_llama: Path, tmp_path: Path) -> None:
    ca = ConsortiumCA.init(tmp_path / "ws", consortium="revocation")
    for name, role in (("server-0", "server"), ("site-a", "site"), ("site-b", "site")):
        ca.issue(name, role)
    nodes = ca.workspace / "nodes"
    server_id = NodeIdentity.load(nodes / "server-0").node_id

    def stub(name: str, endpoint: str) -> ServerStub:
        tls = TlsConfig.for_node(NodeIdentity.load(nodes / name))
        return ServerStub(endpoint, tls=tls, node_id=server_id, timeout=20.0)

    with LocalServers(tiny_llama, [(0, 4)], torch_threads=1, workspace=ca.workspace, nodes=["server-0"]) as local:
        site = stub("site-a", local.endpoints[0])
        session = site.open_session(session_id="s", model_id="", start=0, end=4, max_length=64, batch_size=1)
        token = torch.randn(1, 1, HIDDEN)
        for _ in range(3):
            session.step(token, 0)
        assert main(["keys", "revoke", "--workspace", str(ca.workspace), "site-a"]) == 0
        took = seconds_until_refused(session, token, limit=30, match="revoked")
        assert took < 5, f"the stream outlived the revocation by {took:.1f} s"
        site.close()
        other = stub("site-b", local.endpoints[0])
        assert other.info(timeout=10).end == 4  # the server still serves the other members
        other.close()
