"""Members whose signed records lie cost only themselves (issue 13, findings 3 and 4).

Every node is a consortium member with a valid certificate, so its records pass every
signature check; what it says in them is false:

- a member announces, under its own node id, the endpoint of an honest server (in this
  process, or, marked slow, a real `platform serve --announce-port` process). Clients refuse that record (the endpoint
  shows another node's certificate) and ban the liar's node id; the honest server's own
  record, at the same endpoint, stays routable and generation runs through it.
- a member serving blocks 0:1 announces 0:4 (cheap, in one hop: the route any client
  prefers). The server answers `SpanNotServedError`; generation, parallel forward and
  backward fail over to the replicas (real processes) with unchanged results, and the
  liar's node id is banned.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM
from corolla.inference.client.routing import Hop
from corolla.inference.discovery import DhtNode, ServerRecord
from corolla.inference.errors import AccessDeniedError, InferenceError, SpanNotServedError
from corolla.inference.models import Checkpoint
from corolla.inference.security import TlsConfig
from corolla.inference.server import BlockServer, ServerConfig
from corolla.pki import ConsortiumCA, NodeIdentity
from corolla.platform.launch.servers import LocalServers

pytestmark = pytest.mark.e2e

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeIdentity]:
    ca = ConsortiumCA.init(tmp_path_factory.mktemp("liars") / "ws", consortium="liars")
    nodes = {name: ca.issue(name, "server") for name in ("server-0", "server-1", "endpoint-thief", "span-liar")}
    nodes["site"] = ca.issue("site", "site")
    return nodes


@pytest.fixture(scope="module")
def workspace(consortium: dict[str, NodeIdentity]) -> Path:
    return consortium["site"].directory.parent.parent


def _local_generate(model_dir: Path, prompt: torch.Tensor) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out: torch.Tensor = local.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=None
    )
    return out


def _wait_for(bootstrap: str, site: TlsConfig, model_id: str, wanted: set[tuple[str, str]]) -> list[ServerRecord]:
    """The member-checked records once every (node id, endpoint) in `wanted` is among them."""
    deadline = time.monotonic() + 30
    with DhtNode(bootstrap=[bootstrap], psk=site.identity.swarm_key, record_filter=site.record_filter) as viewer:
        while True:
            records = viewer.find_servers(model_id)
            if wanted <= {(r.node_id, r.endpoint) for r in records} or time.monotonic() > deadline:
                return records
            time.sleep(0.3)


@dataclass
class _Honest:
    """Honest members' servers: endpoints in the order of their spans, and a DHT peer."""

    endpoints: list[str]
    bootstrap: str


@contextlib.contextmanager
def _honest(
    kind: str, model: Path, workspace: Path, nodes: list[NodeIdentity], spans: list[tuple[int, int]], bootstrap: str
) -> Iterator[_Honest]:
    """Real `platform serve` processes, or the same servers in this process (fast)."""
    if kind == "process":
        names = [node.directory.name for node in nodes]
        with LocalServers(
            model, spans, torch_threads=1, workspace=workspace, nodes=names, bootstrap=bootstrap
        ) as processes:
            yield _Honest(processes.endpoints, bootstrap)
        return
    servers: list[BlockServer] = []
    try:
        for node, span in zip(nodes, spans, strict=True):
            config = ServerConfig(model=model, blocks=span, bootstrap=(bootstrap,), tls=TlsConfig.for_node(node))
            servers.append(BlockServer(config).start())
        yield _Honest([server.endpoint for server in servers], bootstrap)
    finally:
        for server in servers:
            server.stop(grace=0)


@contextlib.contextmanager
def _dht_peer(site: TlsConfig) -> Iterator[str]:
    """A bare DHT peer holding the swarm key: the members' bootstrap peer."""
    with DhtNode(psk=site.identity.swarm_key) as peer:
        yield peer.addrs[0]


KINDS = ["in-process", pytest.param("process", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_record_naming_another_nodes_endpoint_bans_only_its_signer(
    kind: str, consortium: dict[str, NodeIdentity], workspace: Path, tiny_llama: Path
) -> None:
    site = TlsConfig.for_node(consortium["site"])
    thief_id, honest = consortium["endpoint-thief"].node_id, consortium["server-0"].node_id
    prompt = torch.randint(0, 500, (2, 5), generator=torch.Generator().manual_seed(31))
    want = _local_generate(tiny_llama, prompt)
    with (
        _dht_peer(site) as bootstrap,
        _honest(kind, tiny_llama, workspace, [consortium["server-0"]], [(0, 4)], bootstrap) as servers,
    ):
        endpoint = servers.endpoints[0]
        port = int(endpoint.rsplit(":", 1)[1])
        # its own signed record, the honest server's endpoint (`platform serve --announce-port`)
        thief = (
            LocalServers(
                tiny_llama,
                [(0, 4)],
                torch_threads=1,
                workspace=workspace,
                nodes=["endpoint-thief"],
                bootstrap=bootstrap,
                per_server_args=[["--announce-port", str(port)]],
            )
            if kind == "process"
            else _started(
                ServerConfig(
                    model=tiny_llama,
                    blocks=(0, 4),
                    bootstrap=(bootstrap,),
                    tls=TlsConfig.for_node(consortium["endpoint-thief"]),
                    announce_port=port,
                )
            )
        )
        with (
            thief,
            RemoteModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[bootstrap], tls=site) as model,
        ):
            seen = _wait_for(bootstrap, site, model.swarm.model_id, {(thief_id, endpoint), (honest, endpoint)})
            assert {(r.node_id, r.endpoint) for r in seen} == {(thief_id, endpoint), (honest, endpoint)}
            told: list[tuple[str, type[InferenceError]]] = []
            model.swarm.router.on_misrepresentation = lambda r, exc: told.append((r.node_id, type(exc)))
            records = model.swarm.router.records(refresh=True)
            assert [(r.node_id, r.endpoint) for r in records] == [(honest, endpoint)]
            bans = model.swarm.router.bans
            assert bans.is_banned(thief_id), "the liar's node was not banned"
            assert not bans.is_banned(honest), "the honest server was banned for another node's lie"
            assert not bans.is_banned(endpoint)
            assert told == [(thief_id, AccessDeniedError)]
            assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None), want)
            model.swarm.router.invalidate()  # a refetch refuses the liar again without touching the honest node
            assert [r.node_id for r in model.swarm.router.records()] == [honest]
            assert not bans.is_banned(honest)


@contextlib.contextmanager
def _started(config: ServerConfig, cls: type[BlockServer] = BlockServer) -> Iterator[BlockServer]:
    server = cls(config).start()
    try:
        yield server
    finally:
        server.stop(grace=0)


class _SpanLiar(BlockServer):
    """A member serving fewer blocks than it announces, and claiming to be fast at them."""

    claimed_end = 4

    def record(self) -> ServerRecord:
        return (
            super().record().model_copy(update={"end": self.claimed_end, "throughput": 1e9, "step_ms_per_block": 0.0})
        )


@pytest.fixture(scope="module", params=KINDS)
def span_swarm(
    request: pytest.FixtureRequest, consortium: dict[str, NodeIdentity], workspace: Path, tiny_llama: Path
) -> Iterator[tuple[_Honest, BlockServer]]:
    """Replicas of blocks 0:2 and 2:4 (real processes, or in this process), and an
    in-process member serving 0:1 that announces 0:4."""
    site = TlsConfig.for_node(consortium["site"])
    nodes = [consortium["server-0"], consortium["server-1"]]
    liar_config = ServerConfig(model=tiny_llama, blocks=(0, 1), tls=TlsConfig.for_node(consortium["span-liar"]))
    with (
        _dht_peer(site) as bootstrap,
        _started(replace(liar_config, bootstrap=(bootstrap,)), _SpanLiar) as liar,
        _honest(request.param, tiny_llama, workspace, nodes, [(0, 2), (2, 4)], bootstrap) as servers,
    ):
        wanted = {(consortium["span-liar"].node_id, liar.endpoint)}
        seen = _wait_for(bootstrap, site, liar.record().model_id, wanted)
        assert wanted <= {(r.node_id, r.endpoint) for r in seen}, "the liar's record never reached the DHT"
        yield servers, liar


def _client(span_swarm: tuple[_Honest, BlockServer], site: TlsConfig, model_dir: Path) -> RemoteModelForCausalLM:
    servers, _ = span_swarm
    model = RemoteModelForCausalLM.from_pretrained(model_dir, initial_peers=[servers.bootstrap], tls=site)
    model.swarm.router.jitter = 0.0
    return model


def _liar_record(model: RemoteModelForCausalLM, liar: BlockServer) -> ServerRecord:
    records = [r for r in model.swarm.router.records(refresh=True) if r.endpoint == liar.endpoint]
    assert len(records) == 1 and (records[0].start, records[0].end) == (0, 4), "the client never saw the false claim"
    return records[0]


def test_generation_fails_over_from_a_false_span_claim(
    span_swarm: tuple[_Honest, BlockServer], consortium: dict[str, NodeIdentity], tiny_llama: Path
) -> None:
    _, liar = span_swarm
    site = TlsConfig.for_node(consortium["site"])
    prompt = torch.randint(0, 500, (2, 5), generator=torch.Generator().manual_seed(32))
    want = _local_generate(tiny_llama, prompt)
    told: list[tuple[str, type[InferenceError]]] = []
    with _client(span_swarm, site, tiny_llama) as model:
        record = _liar_record(model, liar)
        model.swarm.router.on_misrepresentation = lambda r, exc: told.append((r.node_id, type(exc)))
        session = model.inference_session(max_length=5 + NEW_TOKENS, batch_size=2)
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None, session=session)
        route = [(h.node_id, h.start, h.end) for h in session.route]
        session.close()
        assert model.swarm.router.bans.is_banned(record.node_id), "the liar was never tried, or not banned"
    assert torch.equal(got, want)
    assert record.node_id not in {node for node, _, _ in route}
    assert told == [(record.node_id, SpanNotServedError)]


def _forward_until_the_liar_is_tried(
    model: RemoteModelForCausalLM, record: ServerRecord, ids: torch.Tensor, expected: torch.Tensor
) -> None:
    """Forwards spread over replicas: repeat one until the route has taken the liar (its
    node id is then banned), every output equal to `expected`."""
    for _ in range(20):
        if model.swarm.router.bans.is_banned(record.node_id):
            return
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)
    assert model.swarm.router.bans.is_banned(record.node_id), "the forward never tried the liar"


def test_forward_and_backward_fail_over_from_a_false_span_claim(
    span_swarm: tuple[_Honest, BlockServer], consortium: dict[str, NodeIdentity], tiny_llama: Path
) -> None:
    _, liar = span_swarm
    site = TlsConfig.for_node(consortium["site"])
    local = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(33))
    with _client(span_swarm, site, tiny_llama) as model:
        record = _liar_record(model, liar)
        _forward_until_the_liar_is_tried(model, record, ids, local(ids).logits)

        # backward whose trace names the liar's hop (as if its forward had been accepted):
        # the backward goes to the replicas instead, with the local gradient
        model.swarm.router.bans.succeeded(record.node_id)
        hidden = model.client_parts.embed(ids).detach()
        grad = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(34))
        got, _ = model.blocks.backward_through([(Hop(record, 0, 4), hidden)], grad)
        assert model.swarm.router.bans.is_banned(record.node_id)
    x = hidden.clone().requires_grad_(True)
    (Checkpoint.open(tiny_llama).load_span(0, 4)(x) * grad).sum().backward()
    assert got is not None
    torch.testing.assert_close(got, x.grad, rtol=0, atol=1e-5)


def test_adapter_calls_fail_over_from_a_false_span_claim(
    span_swarm: tuple[_Honest, BlockServer], consortium: dict[str, NodeIdentity], tiny_llama: Path
) -> None:
    """With a LoRA adapter, the liar refuses the adapter's blocks it does not hold
    (`SpanNotServedError` from PutAdapter): the forward goes to the replicas all the same."""
    _, liar = span_swarm
    site = TlsConfig.for_node(consortium["site"])
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(35))
    with _client(span_swarm, site, tiny_llama) as model:
        adapter = LoraAdapter.init(model.checkpoint, LoraSettings(r=4, alpha=8.0, targets=("q_proj",)), seed=3)
        with torch.no_grad():
            for name, p in adapter.named_weights():
                if name.endswith("lora_B"):  # B starts at zero: make the adapter matter
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(36)) * 0.1)
        model.use_adapter(adapter)
        record = _liar_record(model, liar)
        with torch.no_grad():
            first = model(ids).logits
        _forward_until_the_liar_is_tried(model, record, ids, first)
        with torch.no_grad():
            again = model(ids).logits  # the liar is banned: the replicas only
            model.use_adapter(None)
            base = model(ids).logits
    torch.testing.assert_close(first, again, rtol=0, atol=1e-5)
    assert not torch.allclose(first, base, atol=1e-3), "the adapter was not applied"
