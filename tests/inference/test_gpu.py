"""Serving on a GPU: the real SmolLM2 through `--device cuda` servers against local `transformers`
on the same GPU, quantized serving with bitsandbytes' CUDA kernels, and one DP-LoRA step through a
cuda server against the local Opacus step (tests/training/test_dp_step_exact.py on the cpu).

Every test here is marked `gpu` and skips, with the reason, where torch sees no CUDA device;
`benchmarks/gpu_check.sh` runs them with a short GPU benchmark.

Tolerances (rtol=0): a GPU runs other kernels than transformers' for the same maths (our fused
q/k/v and gate/up matmuls, other reduction orders), so float32 logits agree to rounding, not
bit for bit: atol 2e-3 on logits of magnitude ~20 (float32's 1e-7 relative, grown through 30
blocks), and the greedy tokens are identical. bfloat16 keeps 8 bits of mantissa: its logits are
compared by relative L2 against float32 transformers, bounded by 3e-2 (bf16 rounding alone gives
about 1e-2 per block output, docs/inference.md). Quantized: the same bounds the real-model
quality test uses on the cpu (int8 0.15, nf4 0.6 relative L2 of logits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM
from corolla.inference.device import DeviceKind
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.server import BlockServer
from corolla.inference.server.quantization import quantized_bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch sees none on this machine"),
]

FP32_LOGITS_ATOL = 2e-3
BF16_REL_L2 = 3e-2
QUANT_REL_L2 = {"int8": 0.15, "nf4": 0.6}
PROMPT = "The patient presented with a persistent cough and"
SPANS = [(0, 15), (15, 30)]


def _rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.fixture(scope="module")
def local_cuda(smollm2: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).to("cuda").eval()


@pytest.fixture(scope="module")
def prompt_ids(smollm2: Path) -> torch.Tensor:
    return AutoTokenizer.from_pretrained(smollm2)(PROMPT, return_tensors="pt").input_ids


@contextmanager
def _remote(
    model: Path, start_server: Callable[..., BlockServer], spans: list[tuple[int, int]], **server: object
) -> Iterator[RemoteModelForCausalLM]:
    servers = [start_server(model, span, device=DeviceKind.CUDA, **server) for span in spans]
    assert all(s.device is not None and s.device.type == "cuda" for s in servers)
    remote = RemoteModelForCausalLM.from_pretrained(model, servers=[s.endpoint for s in servers], device="cuda")
    try:
        yield remote
    finally:
        remote.close()


def test_smollm2_on_cuda_servers_equals_transformers_on_cuda(
    smollm2: Path, start_server: Callable[..., BlockServer], local_cuda: torch.nn.Module, prompt_ids: torch.Tensor
) -> None:
    with _remote(smollm2, start_server, SPANS) as remote:
        ids = prompt_ids.to("cuda")
        with torch.no_grad():
            got = remote(ids).logits
            want = local_cuda(ids).logits
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, want, rtol=0, atol=FP32_LOGITS_ATOL)
        generated = remote.generate(ids, max_new_tokens=32)
        reference = local_cuda.generate(ids, max_new_tokens=32, do_sample=False)
        assert generated.tolist() == reference[:, : generated.shape[1]].tolist()


def test_bfloat16_cuda_servers_stay_within_bf16_rounding(
    smollm2: Path, start_server: Callable[..., BlockServer], local_cuda: torch.nn.Module, prompt_ids: torch.Tensor
) -> None:
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bfloat16")
    with _remote(smollm2, start_server, SPANS, dtype="bfloat16") as remote:
        ids = prompt_ids.to("cuda")
        with torch.no_grad():
            error = _rel_l2(remote(ids).logits, local_cuda(ids).logits)
        assert error < BF16_REL_L2


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_cuda_servers(
    smollm2: Path,
    start_server: Callable[..., BlockServer],
    local_cuda: torch.nn.Module,
    prompt_ids: torch.Tensor,
    mode: str,
) -> None:
    with _remote(smollm2, start_server, SPANS, quant=mode) as remote:
        ids = prompt_ids.to("cuda")
        with torch.no_grad():
            error = _rel_l2(remote(ids).logits, local_cuda(ids).logits)
        assert error < QUANT_REL_L2[mode]
        assert len(remote.generate(ids, max_new_tokens=8)[0]) == ids.shape[1] + 8


def test_quantized_span_lives_on_cuda(smollm2: Path, start_server: Callable[..., BlockServer]) -> None:
    server = start_server(smollm2, (0, 2), device=DeviceKind.CUDA, quant="int8")
    assert server.backend is not None
    span = server.backend.span
    devices = {t.device.type for t in [*span.parameters(), *span.buffers()]}
    assert devices == {"cuda"}
    fp32_bytes = 4 * sum(p.numel() for p in Checkpoint.open(smollm2).load_span(0, 2).parameters())
    assert quantized_bytes(span) < 0.35 * fp32_bytes  # int8: a quarter of the float32 weights, plus scales


@pytest.mark.parametrize("exchange", ["per-sample", "flat"])
def test_dp_lora_step_through_a_cuda_server_equals_local_opacus(
    tiny_llama: Path, start_server: Callable[..., BlockServer], exchange: str
) -> None:
    from corolla.training.clinical import synthetic_clinical
    from corolla.training.data import encode
    from corolla.training.local_trainer import LocalTrainer
    from corolla.training.remote_trainer import RemoteTrainer

    servers = [start_server(tiny_llama, span, device=DeviceKind.CUDA) for span in [(0, 2), (2, 4)]]
    remote = RemoteModelForCausalLM.from_pretrained(tiny_llama, servers=[s.endpoint for s in servers])
    try:
        data = synthetic_clinical(sites=1, records_per_site=6, test_records=8, seed=5)
        batch = encode(list(data.sites[0]), AutoTokenizer.from_pretrained(tiny_llama), max_length=128)
        settings = LoraSettings(r=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
        start = LoraAdapter.init(remote.checkpoint, settings, seed=3)
        with torch.no_grad():  # nonzero B, so that A's gradients are not all zero
            generator = torch.Generator().manual_seed(4)
            for name, p in start.named_weights():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        kwargs = dict(lr=1.0, noise_multiplier=0.8, max_grad_norm=0.05, expected_batch_size=6, optimizer="sgd")
        clone = lambda: LoraAdapter(start.checkpoint, start.settings, start.state())  # noqa: E731
        swarm = RemoteTrainer(remote, clone(), exchange=exchange, generator=torch.Generator().manual_seed(7), **kwargs)
        local = LocalTrainer(tiny_llama, clone(), generator=torch.Generator().manual_seed(7), **kwargs)
        assert abs(swarm.step(batch) - local.step(batch)) < 1e-5
        got, want = swarm.adapter.state(), local.adapter.state()
        for name in want:
            # cuda against cpu float32: rounding of other kernels, far below the step's size
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)
            assert not torch.equal(want[name], start.state()[name])
    finally:
        remote.close()
