"""The swarm computes exactly what the local model computes (fp32, rtol=0).

Servers run in this process without the DHT (addressed directly); the DHT path and
real processes are covered by tests/e2e.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.models import Checkpoint
from corolla.inference.server import BlockServer

ATOL = 1e-5


@pytest.fixture
def remote(tiny_model: Path, start_server: Callable[..., BlockServer]) -> RemoteModelForCausalLM:
    servers = [start_server(tiny_model, span) for span in [(0, 1), (1, 3), (3, 4)]]
    model = RemoteModelForCausalLM.from_pretrained(tiny_model, servers=[s.endpoint for s in servers])
    yield model
    model.close()


def test_parallel_forward_logits_equal_local(remote: RemoteModelForCausalLM, tiny_model: Path) -> None:
    local = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.randint(0, 500, (4, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, local(ids).logits, rtol=0, atol=ATOL)


def test_greedy_generation_equals_local(remote: RemoteModelForCausalLM, tiny_model: Path) -> None:
    local = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(3))
    want = local.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=None)
    got = remote.generate(prompt, max_new_tokens=32, eos_token_id=None)
    assert got.shape == (2, 7 + 32)
    assert torch.equal(got, want)


def test_generation_stops_like_local_at_eos(remote: RemoteModelForCausalLM, tiny_model: Path) -> None:
    """With the checkpoint's own EOS (a token the random model does emit for some
    prompts) the stopping and padding rule is the same as transformers'."""
    local = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = torch.randint(0, 500, (3, 5), generator=torch.Generator().manual_seed(4))
    eos = int(local.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=None)[0, -2])
    want = local.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = remote.generate(prompt, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)


def test_sampling_matches_local_with_same_seed(remote: RemoteModelForCausalLM, tiny_model: Path) -> None:
    local = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = torch.randint(0, 500, (1, 6), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    want = local.generate(
        prompt, max_new_tokens=16, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, eos_token_id=None
    )
    torch.manual_seed(11)
    got = remote.generate(
        prompt, max_new_tokens=16, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, eos_token_id=None
    )
    assert torch.equal(got, want)


def test_backward_through_swarm_equals_local(remote: RemoteModelForCausalLM, tiny_model: Path) -> None:
    """Input gradients through the remote frozen blocks equal local autograd through
    the same blocks."""
    span = Checkpoint.open(tiny_model).load_span(0, 4)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, span.config.hidden_size, generator=generator)
    weight = torch.randn(2, 9, span.config.hidden_size, generator=generator)
    x_local, x_remote = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (span(x_local) * weight).sum().backward()
    (remote.blocks(x_remote) * weight).sum().backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, rtol=0, atol=ATOL)
