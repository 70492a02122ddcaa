"""`--quant int8` and `--quant nf4` serve on CPU; their logit error against fp32 is bounded.

Measured on the tiny random checkpoints (4 blocks, hidden 64), batch 4 x 32 tokens,
relative L2 error of the logits against local fp32 transformers (see docs/inference.md):

    llama int8: 0.014 (fp32 compute), 0.016 (bf16)   nf4: 0.18 / 0.17
    gpt2  int8: 0.009 / 0.010                        nf4: 0.08 / 0.08

Random weights are a worst case for 4-bit (no structure to preserve); the bounds are
about 1.5x the measured values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.server import BlockServer

BOUNDS = {"int8": 0.025, "nf4": 0.28}


@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_logit_error_is_bounded(
    tiny_model: Path, start_server: Callable[..., BlockServer], quant: str, dtype: str
) -> None:
    servers = [start_server(tiny_model, span, quant=quant, dtype=dtype) for span in [(0, 2), (2, 4)]]
    assert all(s.backend.quant == quant for s in servers)
    ids = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    want = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(ids).logits.detach()
    with RemoteModelForCausalLM.from_pretrained(tiny_model, servers=[s.endpoint for s in servers]) as model:
        with torch.no_grad():
            got = model(ids).logits
        generated = model.generate(ids[:1, :4], max_new_tokens=8, eos_token_id=None)
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < BOUNDS[quant], f"{quant}/{dtype}: relative logit error {rel:.4f}"
    assert generated.shape == (1, 12)


def test_quantized_backward_reaches_the_input(tiny_llama: Path, start_server: Callable[..., BlockServer]) -> None:
    """Training sends gradients back through frozen quantized blocks."""
    server = start_server(tiny_llama, (0, 4), quant="nf4")
    with RemoteModelForCausalLM.from_pretrained(tiny_llama, servers=[server.endpoint]) as model:
        x = torch.randn(2, 5, 64, requires_grad=True)
        model.blocks(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
