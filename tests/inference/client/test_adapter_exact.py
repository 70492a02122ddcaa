"""LoRA through the swarm equals PEFT locally; per-sample gradients equal Opacus's.

The adapter is written in PEFT's format and loaded with plain `PeftModel.from_pretrained`
on the same checkpoint: that model is the reference for outputs, and wrapped in Opacus's
`GradSampleModule`, for per-sample gradients (fp32, rtol=0).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule
from peft import PeftModel
from transformers import AutoModelForCausalLM

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM
from corolla.inference.errors import AdapterNotFoundError, BadRequestError, SpanNotServedError, StepNotFoundError
from corolla.inference.server import BlockServer
from corolla.inference.wire.backward import AdapterGrads

ATOL = 1e-5
GRAD_ATOL = 1e-6
TARGETS = {"llama": ("q_proj", "v_proj", "o_proj", "down_proj"), "gpt2": ("c_attn", "c_proj", "c_fc")}


def _adapter(remote: RemoteModelForCausalLM, arch: str, seed: int = 1) -> LoraAdapter:
    adapter = LoraAdapter.init(remote.checkpoint, LoraSettings(r=4, alpha=8.0, targets=TARGETS[arch]), seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # B starts at zero: make it matter
        for name, p in adapter.named_weights():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return adapter


def _per_sample_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B,): each sequence's mean next-token cross-entropy."""
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return ce.mean(dim=1)


def _wire_name(peft_name: str) -> str:
    """PEFT parameter name (`...layers.2.self_attn.q_proj.lora_A.default.weight`) -> `2.self_attn.q_proj.lora_A`."""
    match = re.search(r"(?:layers|h)\.(\d+)\.(.+)\.(lora_[AB])\.default\.weight$", peft_name)
    assert match is not None, peft_name
    return f"{match[1]}.{match[2]}.{match[3]}"


@pytest.fixture
def swarm(
    tiny_model: Path, start_server: Callable[..., BlockServer]
) -> Iterator[tuple[RemoteModelForCausalLM, str, list[BlockServer]]]:
    servers = [start_server(tiny_model, span) for span in [(0, 1), (1, 3), (3, 4)]]
    remote = RemoteModelForCausalLM.from_pretrained(tiny_model, servers=[s.endpoint for s in servers])
    arch = remote.checkpoint.family.name
    yield remote, arch, servers
    remote.close()


def _peft(tiny_model: Path, adapter: LoraAdapter, tmp_path: Path) -> PeftModel:
    adapter.save_peft(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    return PeftModel.from_pretrained(base, tmp_path / "adapter").eval()


def test_forward_with_adapter_equals_peft(swarm, tiny_model: Path, tmp_path: Path) -> None:
    remote, arch, _ = swarm
    adapter = _adapter(remote, arch)
    peft_model = _peft(tiny_model, adapter, tmp_path)
    ids = torch.randint(0, 500, (3, 21), generator=torch.Generator().manual_seed(0))
    remote.use_adapter(adapter)
    with torch.no_grad():
        want = peft_model(ids).logits
        torch.testing.assert_close(remote(ids).logits, want, rtol=0, atol=ATOL)
        remote.use_adapter(None)  # and the base model is back
        base_logits = remote(ids).logits
    assert (base_logits - want).abs().max() > 1e-3


def test_generation_with_adapter_equals_peft(swarm, tiny_model: Path, tmp_path: Path) -> None:
    remote, arch, _ = swarm
    adapter = _adapter(remote, arch, seed=2)
    peft_model = _peft(tiny_model, adapter, tmp_path)
    remote.load_adapter(tmp_path / "adapter")  # the directory round trip, as `platform generate --adapter`
    prompt = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(1))
    want = peft_model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, eos_token_id=None)
    got = remote.generate(prompt, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(got, want)


def test_peft_directory_round_trip(swarm, tmp_path: Path) -> None:
    remote, arch, _ = swarm
    adapter = _adapter(remote, arch)
    adapter.save_peft(tmp_path / "a")
    loaded = LoraAdapter.load_peft(tmp_path / "a", remote.checkpoint)
    assert loaded.settings == adapter.settings
    got, want = loaded.state(), adapter.state()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name])


def _remote_grads(remote: RemoteModelForCausalLM, ids: torch.Tensor, mode: AdapterGrads, step_id: str = ""):
    hidden = remote.client_parts.embed(ids)
    out, trace = remote.blocks.forward_with_trace(hidden, 0, remote.num_blocks)
    out = out.detach().requires_grad_(True)
    losses = _per_sample_loss(remote.client_parts.head(out), ids)
    (grad,) = torch.autograd.grad(losses.sum(), out)
    _, parts = remote.blocks.backward_through(trace, grad, adapter_grads=mode, step_id=step_id, grad_input=False)
    return parts


def _opacus_grads(tiny_model: Path, adapter: LoraAdapter, ids: torch.Tensor, tmp_path: Path) -> dict[str, torch.Tensor]:
    peft_model = _peft(tiny_model, adapter, tmp_path)
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)
    peft_model.train()  # Opacus captures activations only in training mode
    for m in peft_model.modules():  # ... where GPT-2 would drop out: the swarm never does
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    module = GradSampleModule(peft_model, loss_reduction="sum")
    _per_sample_loss(module(ids).logits, ids).sum().backward()
    return {_wire_name(n): p.grad_sample for n, p in module.named_parameters() if p.requires_grad}


def test_per_sample_gradients_equal_opacus(swarm, tiny_model: Path, tmp_path: Path) -> None:
    remote, arch, _ = swarm
    adapter = _adapter(remote, arch)
    remote.use_adapter(adapter)
    ids = torch.randint(0, 500, (5, 17), generator=torch.Generator().manual_seed(2))
    got: dict[str, torch.Tensor] = {}
    for part in _remote_grads(remote, ids, AdapterGrads.PER_SAMPLE):
        got.update(part.result.per_sample)
    want = _opacus_grads(tiny_model, adapter, ids, tmp_path)
    assert got.keys() == want.keys()
    assert all(g.shape[0] == 5 for g in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=GRAD_ATOL)
    assert max(float(g.abs().max()) for g in got.values()) > 1e-3  # not vacuous


def test_flat_clipping_equals_opacus_clip_and_sum(swarm, tiny_model: Path, tmp_path: Path) -> None:
    remote, arch, _ = swarm
    adapter = _adapter(remote, arch)
    remote.use_adapter(adapter)
    ids = torch.randint(0, 500, (4, 15), generator=torch.Generator().manual_seed(3))
    parts = _remote_grads(remote, ids, AdapterGrads.NORMS, step_id="s1")
    assert all(not p.result.per_sample or p.result.squared_norms is not None for p in parts)
    norms = torch.stack([p.result.squared_norms for p in parts]).sum(0).sqrt()
    want = _opacus_grads(tiny_model, adapter, ids, tmp_path)
    want_norms = torch.stack([g.reshape(4, -1).norm(dim=1) for g in want.values()], dim=1).norm(dim=1)
    torch.testing.assert_close(norms, want_norms, rtol=0, atol=GRAD_ATOL)
    bound = (want_norms.max() + want_norms.min()) / 2  # the largest sample is clipped, the smallest not
    clip = (bound / (want_norms + 1e-6)).clamp(max=1.0)
    assert (clip < 1).any() and (clip == 1).any()
    sums = remote.blocks.clip_sums(parts, clip)
    assert sums.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(sums[name], torch.einsum("i,i...", clip, g), rtol=0, atol=GRAD_ATOL)
    with pytest.raises(StepNotFoundError):  # consumed on the server
        remote.swarm.stub(parts[0].hop.endpoint).clip_sum(parts[0].step_id, clip)
    again = remote.blocks.clip_sums(parts, clip)  # the client redoes the lost backward: same sums
    for name in want:
        torch.testing.assert_close(again[name], sums[name], rtol=0, atol=GRAD_ATOL)


def test_bad_adapters_are_refused_and_the_server_keeps_serving(swarm) -> None:
    remote, arch, servers = swarm
    stub = remote.swarm.stub(servers[1].endpoint)  # holds blocks 1:3
    adapter = _adapter(remote, arch)
    good = adapter.span(1, 3)
    model_id = remote.swarm.model_id
    from corolla.inference.wire.adapters import adapter_hash

    def put(tensors: dict[str, torch.Tensor], digest: str | None = None) -> None:
        stub.put_adapter(tensors, scaling=2.0, model_id=model_id, digest=digest or adapter_hash(tensors, 2.0))

    name_a = next(n for n in good if n.endswith("lora_A"))
    with pytest.raises(BadRequestError, match="expected"):
        put({**good, name_a: torch.zeros(4, 3)})  # wrong in_features
    with pytest.raises(BadRequestError, match="both lora_A and lora_B"):
        put({name_a: good[name_a]})
    with pytest.raises(SpanNotServedError):
        put(adapter.span(0, 2))  # block 0 is not on this server
    with pytest.raises(BadRequestError, match="hash"):
        put(good, digest="0" * 64)
    with pytest.raises(BadRequestError, match="NaN"):
        put({**good, name_a: torch.full_like(good[name_a], float("nan"))})
    unknown = torch.randn(1, 3, remote.checkpoint.hidden_size)
    with pytest.raises(AdapterNotFoundError):
        stub.forward(unknown, model_id=model_id, start=1, end=3, adapter="ab" * 32)
    put(good)  # and a good one still goes in
    out = stub.forward(unknown, model_id=model_id, start=1, end=3, adapter=adapter_hash(good, 2.0))
    assert out.shape == unknown.shape
