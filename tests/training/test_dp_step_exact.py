"""One DP-SGD step through the swarm equals the same step in `--in-process` mode (Opacus's
own PrivacyEngine on the whole model), for both exchanges; fp32, rtol=0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM
from corolla.inference.server import BlockServer
from corolla.training.clinical import synthetic_clinical
from corolla.training.data import encode
from corolla.training.local_trainer import LocalTrainer
from corolla.training.remote_trainer import RemoteTrainer

ATOL = 1e-6
TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@pytest.fixture
def remote(tiny_llama: Path, start_server: Callable[..., BlockServer]) -> Iterator[RemoteModelForCausalLM]:
    servers = [start_server(tiny_llama, span) for span in [(0, 2), (2, 4)]]
    model = RemoteModelForCausalLM.from_pretrained(tiny_llama, servers=[s.endpoint for s in servers])
    yield model
    model.close()


def _batch(tiny_llama: Path, n: int):
    data = synthetic_clinical(sites=1, records_per_site=n, test_records=8, seed=5)
    return encode(list(data.sites[0]), AutoTokenizer.from_pretrained(tiny_llama), max_length=128)


def _adapter(remote: RemoteModelForCausalLM) -> LoraAdapter:
    adapter = LoraAdapter.init(remote.checkpoint, LoraSettings(r=4, alpha=8.0, targets=TARGETS), seed=3)
    with torch.no_grad():  # nonzero B, so that A's gradients are not all zero
        generator = torch.Generator().manual_seed(4)
        for name, p in adapter.named_weights():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return adapter


def _clone(adapter: LoraAdapter) -> LoraAdapter:
    return LoraAdapter(adapter.checkpoint, adapter.settings, adapter.state())


@pytest.mark.parametrize("exchange", ["per-sample", "flat"])
@pytest.mark.parametrize("noise", [0.0, 0.8])
def test_swarm_dp_step_equals_local_opacus_step(
    remote: RemoteModelForCausalLM, tiny_llama: Path, exchange: str, noise: float
) -> None:
    """With noise the two draw it from equal generators in the same parameter order, so
    even a noisy step matches; max_grad_norm is set so that some records are clipped."""
    batch = _batch(tiny_llama, 6)
    start = _adapter(remote)
    # SGD: the update is linear in the gradient (Adam's first step, g / (|g| + eps), would
    # turn float rounding in near-zero gradients into visible differences)
    kwargs = dict(lr=1.0, noise_multiplier=noise, max_grad_norm=0.05, expected_batch_size=6, optimizer="sgd")
    swarm = RemoteTrainer(
        remote, _clone(start), exchange=exchange, generator=torch.Generator().manual_seed(7), **kwargs
    )
    local = LocalTrainer(tiny_llama, _clone(start), generator=torch.Generator().manual_seed(7), **kwargs)
    loss_swarm, loss_local = swarm.step(batch), local.step(batch)
    assert abs(loss_swarm - loss_local) < 1e-5
    got, want, before = swarm.adapter.state(), local.adapter.state(), start.state()
    moved = 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=ATOL)
        moved += int(not torch.equal(want[name], before[name]))
    assert moved == len(want)  # every weight took the step


@pytest.mark.parametrize("exchange", ["per-sample", "flat"])
def test_swarm_step_without_dp_equals_local_plain_step(
    remote: RemoteModelForCausalLM, tiny_llama: Path, exchange: str
) -> None:
    batch = _batch(tiny_llama, 5)
    start = _adapter(remote)
    # unclipped, the gradients are large: at lr 0.01 a float32 rounding difference stays below atol
    kwargs = dict(lr=0.01, noise_multiplier=None, max_grad_norm=1.0, expected_batch_size=5, optimizer="sgd")
    swarm = RemoteTrainer(remote, _clone(start), exchange=exchange, **kwargs)
    local = LocalTrainer(tiny_llama, _clone(start), **kwargs)
    for _ in range(2):
        swarm.step(batch), local.step(batch)
    got, want = swarm.adapter.state(), local.adapter.state()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=ATOL)


def test_empty_poisson_batch_still_adds_noise_and_steps(remote: RemoteModelForCausalLM) -> None:
    start = _adapter(remote)
    trainer = RemoteTrainer(
        remote,
        _clone(start),
        lr=1e-2,
        exchange="flat",
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    trainer.step(None)
    after = trainer.adapter.state()
    assert all(not torch.equal(after[n], t) for n, t in start.state().items())


def test_flat_exchange_sends_adapter_sized_gradients(remote: RemoteModelForCausalLM, tiny_llama: Path) -> None:
    batch = _batch(tiny_llama, 6)
    per_sample = RemoteTrainer(
        remote,
        _adapter(remote),
        lr=1e-2,
        exchange="per-sample",
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=6,
    )
    per_sample.step(batch)
    flat = RemoteTrainer(
        remote,
        _adapter(remote),
        lr=1e-2,
        exchange="flat",
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=6,
    )
    flat.step(batch)
    adapter_bytes = flat.adapter.nbytes()
    assert per_sample.bytes["adapter_grads"] == 6 * adapter_bytes
    assert flat.bytes["adapter_grads"] == adapter_bytes + 2 * 6 * 4  # sums + B float32 norms per server
