"""Generation across hosts: every process in its own network namespace, 20 ms on each hop.

A bare bootstrap peer, three `platform serve` processes (blocks 0:2, 2:3, 3:4, so every
server is on the route) and a client, each in a namespace of its own joined by veths
to one bridge (`tests/e2e/netns.py`). Each server's gRPC port is behind a delaying TCP
proxy in its namespace, and the server announces the proxy's port. Everything runs with
the consortium's certificates, one node identity per process. The tokens equal local
`generate()`, the client's traffic went through the proxies (and took at least the
round trips they add), and no namespace outlives the test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.pki import NodeIdentity
from corolla.platform.workspace import throwaway_consortium
from tests.e2e.netns import NetnsLab, namespaces_available
from tests.e2e.swarm_lab import GRPC_PORT, PROXY_PORT, NamespaceSwarm

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

PREFIX = "corm"  # apart from the harness tests' and the benchmark's labs
SUBNET = "10.77.1.0/24"
SPANS = [(0, 2), (2, 3), (3, 4)]
RTT_MS = 20.0
NEW_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def _need_namespaces() -> None:
    available, reason = namespaces_available()
    if not available:
        pytest.skip(reason)


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_generation_through_namespaced_hosts_matches_local(tmp_path: Path, tiny_llama: Path) -> None:
    consortium = throwaway_consortium(tmp_path / "ws", servers=len(SPANS) + 1, sites=1)
    generator = torch.Generator().manual_seed(11)
    prompts = [
        torch.randint(0, 500, (2, 6), generator=generator),  # two prompts in one batch
        torch.randint(0, 500, (1, 9), generator=generator),  # and one alone, of another length
    ]
    local = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    want = [
        local.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=None).tolist()
        for p in prompts
    ]

    with NetnsLab(prefix=PREFIX, subnet=SUBNET) as lab:
        with NamespaceSwarm(lab, tiny_llama, SPANS, rtt_ms=RTT_MS, consortium=consortium) as swarm:
            result = swarm.run_client(
                "generate", "--prompts", json.dumps([p.tolist() for p in prompts]), "--new-tokens", str(NEW_TOKENS)
            ).data
            made = set(lab.namespaces)
            bootstrap = swarm.bootstrap_addr
        servers = swarm.servers  # stopped; each keeps its proxy's stats
    assert len(made) == 1 + 1 + len(SPANS) + 1  # the bridge, the bootstrap peer, the servers, the client
    assert not made & _namespaces(), "the lab left namespaces behind"
    assert not {n for n in _namespaces() if n.startswith(f"{lab.run_id}-")}

    # The output is local generate()'s.
    got = [g["tokens"] for g in result["generations"]]
    assert got == want

    # Every server is on its own host and announced its proxy, not its gRPC port.
    proxies = [f"{s.host.ip}:{PROXY_PORT}" for s in servers]
    assert len({s.host.ip for s in servers}) == len(SPANS)
    assert [s.endpoint for s in servers] == proxies
    assert sorted((r["endpoint"], r["start"], r["end"]) for r in result["records"]) == sorted(
        (p, *span) for p, span in zip(proxies, SPANS, strict=True)
    )
    assert not {f"{s.host.ip}:{GRPC_PORT}" for s in servers} & {r["endpoint"] for r in result["records"]}
    for generation in result["generations"]:
        assert [(h["endpoint"], h["start"], h["end"]) for h in generation["route"]] == [
            (p, *span) for p, span in zip(proxies, SPANS, strict=True)
        ]

    # One identity per process: the records carry the servers' certificates, the
    # bootstrap peer is the fourth server node, the client is the site.
    identities = [NodeIdentity.load(consortium.workspace / "nodes" / name) for name in consortium.servers]
    by_endpoint = {r["endpoint"]: r for r in result["records"]}
    for proxy, identity in zip(proxies, identities[: len(SPANS)], strict=True):
        assert by_endpoint[proxy]["node_id"] == identity.node_id
        assert by_endpoint[proxy]["tls_fingerprint"] == identity.tls_fingerprint
    assert bootstrap.endswith(f"/p2p/{identities[len(SPANS)].node_id}")

    # The traffic crossed the proxies, and took at least the round trips they add:
    # each generated token is one step through all three hops.
    for server in servers:
        stats = server.proxy_stats[-1]
        assert stats is not None and stats["connections"] >= 1 and stats["bytes"] > 0, (server.endpoint, stats)
    floor_s = NEW_TOKENS * len(SPANS) * RTT_MS / 1000
    for generation in result["generations"]:
        assert generation["wall_s"] >= 0.95 * floor_s, (generation["wall_s"], floor_s)
