"""docs/operator.md's "Add a server to a running swarm", run as written: the bash block is
taken from the Markdown (not copied here), on a fresh workspace with a running bootstrap
peer and a tiny model. The new server must come up, answer /health 200 and /metrics with
its metrics, and be found in the swarm.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from corolla.inference.models.tiny import TinySpec, init_tiny
from corolla.platform.workspace import throwaway_consortium
from tests.e2e.netns import wait_for_line

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "operator.md"
SECTION = "## Add a server to a running swarm"


def guide_block() -> str:
    text = GUIDE.read_text()
    if SECTION not in text:
        raise AssertionError(f"{GUIDE} has no section {SECTION!r}")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    if len(blocks) != 1:
        raise AssertionError(f"{SECTION!r} should hold exactly one bash block, found {len(blocks)}")
    return blocks[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_add_a_server_as_the_guide_says(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    throwaway_consortium(workspace, servers=1, sites=1)  # the CA, server-0 for the bootstrap peer, site-0 to look
    model = init_tiny(tmp_path / "model", TinySpec(arch="llama"))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "COROLLA_WORKSPACE": str(workspace)}
    env.pop("COROLLA_CONFIG", None)
    boot = subprocess.Popen(
        [str(bin_dir / "platform"), "swarm", "bootstrap", "--workspace", str(workspace), "--node", "server-0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    server: subprocess.Popen[str] | None = None
    try:
        peers = wait_for_line(boot, "READY", timeout=60).split("dht=", 1)[1].strip()
        metrics_port = _free_port()
        script = tmp_path / "add_server.sh"
        script.write_text(guide_block())
        server = subprocess.Popen(
            ["bash", str(script)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**env, "PEERS": peers, "MODEL": str(model), "PORT": str(_free_port()),
                 "DHT_PORT": str(_free_port()), "METRICS_PORT": str(metrics_port)},
        )  # fmt: skip
        ready = wait_for_line(server, "READY", timeout=120)
        assert "blocks=" in ready
        assert (workspace / "nodes" / "server-d").is_dir()  # step 1 issued its keys
        assert (workspace / "server-d.toml").is_file()  # step 2 wrote its file
        deadline = time.monotonic() + 30
        while _get(f"http://127.0.0.1:{metrics_port}/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _get(f"http://127.0.0.1:{metrics_port}/health") == (200, "ready\n")
        status, text = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and "corolla_server_kv_cache_capacity_bytes" in text
        for _ in range(3):  # the record may take a refresh to reach the bootstrap peer
            found = subprocess.run(
                [str(bin_dir / "platform"), "swarm", "status", "--peers", peers, "--model", str(model),
                 "--workspace", str(workspace), "--node", "site-0"],
                capture_output=True, text=True, env=env, timeout=90, check=False,
            )  # fmt: skip
            assert found.returncode == 0, found.stderr
            if ": 1 server(s)" in found.stdout:
                break
        assert ": 1 server(s)" in found.stdout, found.stdout  # the new server, found through the DHT
    finally:
        if server is not None:
            _stop(server)
        _stop(boot)
