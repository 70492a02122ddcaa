"""int8 and nf4 serving of the real SmolLM2 stay within measured perplexity bounds of fp32.

The code a server runs (`Checkpoint.load_span`, then `quantize_linears`) with the client's fp32
embeddings and head, scored on what `benchmarks/quantization.py` scores: fp32's own greedy
replies to chat-templated medical questions, and held-out synthetic clinical notes. The texts
are a subset of the benchmark's (2 of its questions, 48 reply tokens, 20 notes); the bounds are
the ratios measured on them plus a margin (docs/inference.md, "Quantization quality on a real
model", has the benchmark's figures).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.server.quantization import quantize_linears
from corolla.training.clinical import synthetic_clinical

pytestmark = pytest.mark.slow

QUESTIONS = ("What are the first signs of pneumonia in an elderly patient?", "How do you treat an asthma attack?")
REPLY_TOKENS = 48
NOTES = 20
# Perplexity ratio to fp32, (replies, notes). Measured on these texts: int8 1.007, 1.000; nf4 1.35, 1.52
# (2 CPU cores, bitsandbytes 0.50.2); the bounds add about 15% (int8) and 20-30% (nf4) of margin.
BOUNDS = {"int8": (1.15, 1.08), "nf4": (1.8, 1.8)}


def _logits(client: Any, span: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return client.head(span(client.embed(ids))).float()  # type: ignore[no-any-return]


def _greedy(client: Any, span: Any, prompt: torch.Tensor, eos: int) -> torch.Tensor:
    """fp32 greedy reply, recomputing the prefix each step (no cache): the text to score."""
    ids = prompt
    for _ in range(REPLY_TOKENS):
        token = _logits(client, span, ids)[0, -1].argmax()
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        if int(token) == eos:
            break
    return ids


def _nll(client: Any, span: Any, texts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Mean negative log-likelihood per text: (ids `(B, T)`, scored mask `(B, T)`)."""
    out = []
    for ids, scored in texts:
        logits = _logits(client, span, ids)[:, :-1]
        keep = scored[:, 1:]
        out.append(float(nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep])))
    return out


@pytest.fixture(scope="module")
def texts(smollm2: Path) -> tuple[Checkpoint, Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    checkpoint = Checkpoint.open(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    client = checkpoint.load_client()
    fp32 = checkpoint.load_span(0, checkpoint.num_blocks)
    replies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        ids = _greedy(client, fp32, prompt, int(tokenizer.eos_token_id))
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, prompt.shape[1] :] = True
        replies.append((ids, mask))
    notes = [tokenizer(r.prompt + r.completion).input_ids for r in synthetic_clinical(
        sites=1, records_per_site=1, test_records=NOTES, seed=0
    ).test]  # fmt: skip
    width = max(len(n) for n in notes)
    ids = torch.full((len(notes), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, note in enumerate(notes):
        ids[i, : len(note)] = torch.tensor(note)
        mask[i, : len(note)] = True
    return checkpoint, client, [*replies, (ids, mask)]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_perplexity_stays_within_measured_bounds(
    texts: tuple[Checkpoint, Any, list[tuple[torch.Tensor, torch.Tensor]]], mode: str
) -> None:
    checkpoint, client, scored = texts
    reference = _nll(client, checkpoint.load_span(0, checkpoint.num_blocks), scored)
    quantized = quantize_linears(checkpoint.load_span(0, checkpoint.num_blocks), mode)  # type: ignore[arg-type]
    got = _nll(client, quantized, scored)
    reply_ratio = math.exp(sum(got[:-1]) / len(got[:-1]) - sum(reference[:-1]) / len(reference[:-1]))
    note_ratio = math.exp(got[-1] - reference[-1])
    reply_bound, note_bound = BOUNDS[mode]
    assert reply_ratio <= reply_bound, f"{mode} replies: perplexity {reply_ratio:.3f}x fp32's (bound {reply_bound})"
    assert note_ratio <= note_bound, f"{mode} notes: perplexity {note_ratio:.3f}x fp32's (bound {note_bound})"
