"""deploy/scripts/enrol_sites.py against a real SuperLink: sites are enrolled once their
certificates check, a second run says they already are, a node without a Flower key is refused."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "scripts" / "enrol_sites.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.e2e
def test_enrol_sites_is_checked_and_repeatable(tmp_path: Path) -> None:
    from corolla.platform.flower import ServerTls, SuperLink, SuperLinkConfig
    from corolla.platform.launch.federation import local_consortium

    workspace = tmp_path / "ws"
    consortium = local_consortium(workspace, servers=1, sites=2)
    coordinator = workspace / "nodes" / "coordinator"
    tls = ServerTls(ca_cert=coordinator / "ca.pem", cert=coordinator / "tls.pem", key=coordinator / "tls.key")
    port = _free_port()
    with SuperLink(SuperLinkConfig(tls=tls, port=port), work_dir=tmp_path / "logs"):

        def enrol(*names: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, str(SCRIPT), "--workspace", str(workspace), "--superlink", f"127.0.0.1:{port}"]
            return subprocess.run([*argv, *names], capture_output=True, text=True, timeout=120, check=False)

        first = enrol(*consortium.sites)
        assert first.returncode == 0, first.stderr
        assert all(f"{site}: enrolled as SuperNode" in first.stdout for site in consortium.sites)
        again = enrol(*consortium.sites)
        assert again.returncode == 0, again.stderr
        assert all(f"{site}: already enrolled" in again.stdout for site in consortium.sites)
        server = enrol(consortium.servers[0])
        assert server.returncode == 1 and f"{consortium.servers[0]}: not enrolled" in server.stderr
        assert "Traceback" not in server.stderr
