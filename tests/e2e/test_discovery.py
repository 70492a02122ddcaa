"""Three servers and a client find each other through one bootstrap address.

A bare bootstrap peer (`platform swarm bootstrap`), three `platform serve` processes
given only its address, and a client given only its address: the client sees all
three, generates through them, and `platform swarm status` lists them. A server that
stops is out of routing once its record expires (a 4 s TTL here).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.models import Checkpoint
from corolla.inference.security import TlsConfig
from corolla.pki import NodeIdentity
from corolla.platform.launch.servers import LocalServers
from corolla.platform.workspace import LocalConsortium, throwaway_consortium

pytestmark = pytest.mark.e2e

TTL = 4.0


@pytest.fixture
def consortium(tmp_path: Path) -> LocalConsortium:
    """A CA with four server nodes (three serve, one is the bootstrap peer) and a site."""
    # two sites: the client here, and `swarm status` (one identity is one DHT node at a time)
    return throwaway_consortium(tmp_path / "ws", servers=4, sites=2)


@pytest.fixture
def bootstrap(consortium: LocalConsortium) -> str:
    args = ["--workspace", str(consortium.workspace), "--node", consortium.servers[3]]
    process = subprocess.Popen(
        [sys.executable, "-m", "corolla", "swarm", "bootstrap", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("READY dht="), process.stderr.read()  # type: ignore[union-attr]
        yield line.strip().split("=", 1)[1]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_servers_and_client_meet_through_one_bootstrap(
    bootstrap: str, consortium: LocalConsortium, tiny_llama: Path
) -> None:
    model_id = Checkpoint.open(tiny_llama).model_id
    spans = [(0, 2), (2, 4), (2, 4)]
    site = TlsConfig.for_node(NodeIdentity.load(consortium.workspace / "nodes" / consortium.sites[0]))
    with (
        LocalServers(
            tiny_llama,
            spans,
            torch_threads=1,
            bootstrap=bootstrap,
            workspace=consortium.workspace,
            nodes=consortium.servers[:3],
            extra_args=["--announce-ttl", str(TTL)],
        ) as swarm,
        RemoteModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap], tls=site) as model,
    ):
        records = model.swarm.router.records(refresh=True)
        assert sorted((r.endpoint, r.start, r.end) for r in records) == sorted(
            (s.endpoint, *s.blocks) for s in swarm.servers
        )
        assert all(r.model_id == model_id and r.throughput > 0 and r.step_ms_per_block > 0 for r in records)

        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "corolla",
                "swarm",
                "status",
                "--peers",
                bootstrap,
                "--model",
                str(tiny_llama),
                "--workspace",
                str(consortium.workspace),
                "--node",
                consortium.sites[1],
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "3 server(s)" in status.stdout and "all covered" in status.stdout
        assert "servers per block: 1 1 2 2" in status.stdout

        prompt = torch.randint(0, 500, (1, 5), generator=torch.Generator().manual_seed(9))
        want = (
            AutoModelForCausalLM.from_pretrained(tiny_llama)
            .eval()
            .generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=None)
        )
        assert torch.equal(model.generate(prompt, max_new_tokens=8, eos_token_id=None), want)

        stopped = swarm.servers[1]
        stopped.process.terminate()  # a clean stop: no withdrawal is needed, the record expires
        stopped.process.wait(timeout=30)
        deadline = time.time() + TTL + 10
        while time.time() < deadline:
            endpoints = {r.endpoint for r in model.swarm.router.records(refresh=True)}
            if stopped.endpoint not in endpoints:
                break
            time.sleep(0.5)
        assert stopped.endpoint not in endpoints, "the stopped server is still announced after its TTL"
        assert {swarm.servers[0].endpoint, swarm.servers[2].endpoint} <= endpoints
        route = model.swarm.router.generation_route(0, 4)
        assert stopped.endpoint not in [hop.endpoint for hop in route]
        assert torch.equal(model.generate(prompt, max_new_tokens=8, eos_token_id=None), want)
