"""The server's training state: bounded, refuses rather than drops pending work, and a
malformed request loses nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM
from corolla.inference.errors import BadRequestError, MessageTooLargeError, SessionLimitError, StepNotFoundError
from corolla.inference.server import BlockServer
from corolla.inference.server.adapters import AdapterStore, GradStore
from corolla.inference.wire.adapters import adapter_hash
from corolla.inference.wire.backward import AdapterGrads


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_grad_store_refuses_new_steps_instead_of_dropping_pending_ones() -> None:
    store = GradStore(budget_bytes=1000, ttl=60.0, clock=_Clock())
    store.put("a", 2, {"w": torch.zeros(2, 100)})  # 800 bytes
    with pytest.raises(SessionLimitError):
        store.put("b", 2, {"w": torch.zeros(2, 100)})
    assert store.pop("a")[0] == 2  # still there
    with pytest.raises(StepNotFoundError):
        store.pop("a")


def test_grad_store_entries_expire() -> None:
    clock = _Clock()
    store = GradStore(budget_bytes=1000, ttl=60.0, clock=clock)
    store.put("a", 1, {"w": torch.zeros(1, 10)})
    clock.now = 61.0
    with pytest.raises(StepNotFoundError):
        store.pop("a")
    store.put("b", 2, {"w": torch.zeros(2, 100)})  # the expired entry no longer counts


def test_adapter_store_keeps_what_is_used() -> None:
    clock = _Clock()
    store = AdapterStore(budget_bytes=10_000, ttl=60.0, clock=clock)
    adapter = object()
    store._put("h", adapter, 100)  # type: ignore[arg-type]
    for t in (50.0, 100.0, 150.0):  # used every 50 s: never older than the ttl since its last use
        clock.now = t
        assert store.get("h") is adapter


@pytest.fixture
def remote(tiny_llama: Path, start_server: Callable[..., BlockServer]):
    server = start_server(tiny_llama, (0, 4), max_message_bytes=1 << 20)
    model = RemoteModelForCausalLM.from_pretrained(tiny_llama, servers=[server.endpoint])
    yield model, server
    model.close()


def test_per_sample_gradients_beyond_the_limits_are_refused_before_any_work(remote) -> None:
    model, server = remote
    adapter = LoraAdapter.init(model.checkpoint, LoraSettings(r=8, targets=("q_proj", "v_proj", "down_proj")))
    stub = model.swarm.stub(server.endpoint)
    tensors = adapter.span(0, 4)
    digest = adapter_hash(tensors, adapter.scaling)
    stub.put_adapter(tensors, scaling=adapter.scaling, model_id=model.swarm.model_id, digest=digest)
    batch = 1 + (1 << 20) // (4 * sum(t.numel() for t in tensors.values()))  # just past 1 MiB of copies
    hidden = torch.randn(batch, 1, model.checkpoint.hidden_size)
    with pytest.raises(MessageTooLargeError, match="smaller batches"):
        stub.backward(
            hidden,
            hidden,
            model_id=model.swarm.model_id,
            start=0,
            end=4,
            adapter=digest,
            adapter_grads=AdapterGrads.PER_SAMPLE,
        )
    small = hidden[:2]
    result = stub.backward(
        small,
        small,
        model_id=model.swarm.model_id,
        start=0,
        end=4,
        adapter=digest,
        adapter_grads=AdapterGrads.NORMS,
        step_id="s",
    )
    assert result.squared_norms is not None
    with pytest.raises(BadRequestError):  # malformed clip factors ...
        stub.clip_sum("s", torch.tensor([1.0, float("nan")]))
    sums = stub.clip_sum("s", torch.tensor([1.0, 0.5]))  # ... leave the gradients in place
    assert set(sums) == set(tensors)
