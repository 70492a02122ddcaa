"""Held-out scoring with the prompt shared (`training.scoring`) equals today's scoring, one
padded row per (note, label) (`data.evaluate`): the same accuracy, and every candidate's total
and every record's loss within ATOL (rtol=0). Through a Hugging Face cache, without a cache,
and through the swarm (inference sessions rewound between labels), with a LoRA adapter."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM
from corolla.inference.server import BlockServer
from corolla.training.clinical import synthetic_clinical
from corolla.training.data import (
    DataError,
    LogitsFn,
    Record,
    completion_token_logprobs,
    encode,
    evaluate,
    per_record_loss,
)
from corolla.training.scoring import (
    LabelScores,
    PrefixModel,
    evaluate_shared,
    hf_prefix_model,
    logits_prefix_model,
    remote_prefix_model,
    score_labels,
)

# Totals are float32 sums of a few log-probabilities of up to ~70 in all (float32 spacing there:
# 8e-6), computed in another order (a cache, other matmul shapes): measured differences 1.5e-5.
ATOL = 1e-4
TARGETS = ("q_proj", "v_proj", "down_proj", "c_attn", "c_fc")  # Llama's and GPT-2's modules


def _records() -> tuple[list[Record], list[str]]:
    data = synthetic_clinical(sites=1, records_per_site=1, test_records=24, seed=11)
    test = list(data.test)
    # one completion that is not its label's candidate: its loss is a continuation of its own
    test[3] = Record(prompt=test[3].prompt, completion=test[3].completion.strip() + " ")
    return test, sorted({r.completion.strip() for r in test})


def _adapter(model_dir: Path) -> LoraAdapter:
    from corolla.inference.models import Checkpoint

    adapter = LoraAdapter.init(Checkpoint.open(model_dir), LoraSettings(r=4, alpha=8.0, targets=TARGETS), seed=1)
    with torch.no_grad():  # a nonzero B: the adapter changes the outputs
        generator = torch.Generator().manual_seed(2)
        for name, p in adapter.named_weights():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return adapter


def _peft_model(model_dir: Path, adapter: LoraAdapter) -> torch.nn.Module:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), adapter.peft_config())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in adapter.named_weights():
            params[adapter.peft_key(name).replace(".weight", ".default.weight")].copy_(weight)
    return model.eval()


def _reference(
    logits_fn: LogitsFn, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], labels: Sequence[str]
) -> LabelScores:
    """Today's scoring: one padded row per (record, label), whole forwards."""
    candidates = [Record(prompt=r.prompt, completion=f" {label}") for r in records for label in labels]
    with torch.no_grad():
        batch = encode(candidates, tokenizer, max_length=None)
        totals = completion_token_logprobs(logits_fn(batch.input_ids), batch).sum(dim=1)
        own = encode(records, tokenizer, max_length=None)
        losses = per_record_loss(logits_fn(own.input_ids), own)
    truth = torch.tensor([labels.index(r.completion.strip()) for r in records])
    return LabelScores(totals=totals.view(len(records), len(labels)), losses=losses, truth=truth)


def _assert_equal(got: LabelScores, want: LabelScores) -> None:
    torch.testing.assert_close(got.totals, want.totals, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.losses, want.losses, rtol=0, atol=ATOL)
    assert torch.equal(got.totals.argmax(dim=1), want.totals.argmax(dim=1))
    assert got.evaluation().accuracy == want.evaluation().accuracy


@pytest.fixture
def swarm(tiny_llama: Path, start_server: Callable[..., BlockServer]) -> Iterator[RemoteModelForCausalLM]:
    servers = [start_server(tiny_llama, span) for span in [(0, 2), (2, 4)]]
    model = RemoteModelForCausalLM.from_pretrained(tiny_llama, servers=[s.endpoint for s in servers])
    yield model
    model.close()


@pytest.mark.parametrize("how", ["hf-cache", "recompute"])
def test_shared_prefix_scoring_equals_one_row_per_candidate(tiny_model: Path, how: str) -> None:
    records, labels = _records()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = _peft_model(tiny_model, _adapter(tiny_model))

    def logits(ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(input_ids=ids).logits
        return out

    want = _reference(logits, tokenizer, records, labels)
    prefix: PrefixModel = hf_prefix_model(model) if how == "hf-cache" else logits_prefix_model(logits)
    seen: list[tuple[int, int]] = []
    got = score_labels(prefix, tokenizer, records, labels, batch_size=5, progress=lambda d, n: seen.append((d, n)))
    _assert_equal(got, want)
    assert seen[-1] == (len(records), len(records)) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    old = evaluate(logits, tokenizer, records, labels, batch_size=64)
    new = evaluate_shared(prefix, tokenizer, records, labels, batch_size=64)
    assert new.accuracy == old.accuracy and new.chance == old.chance
    assert abs(new.loss - old.loss) <= ATOL


def test_shared_prefix_scoring_through_the_swarm(swarm: RemoteModelForCausalLM, tiny_llama: Path) -> None:
    """One inference session per batch, rewound to the prompt before each label; two batches at once."""
    records, labels = _records()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    adapter = _adapter(tiny_llama)
    swarm.use_adapter(adapter)
    local = _peft_model(tiny_llama, adapter)
    want = _reference(lambda ids: local(input_ids=ids).logits, tokenizer, records, labels)
    got = score_labels(remote_prefix_model(swarm), tokenizer, records, labels, batch_size=4, workers=2)
    _assert_equal(got, want)


def test_shared_scoring_checks_its_inputs(tiny_llama: Path) -> None:
    records, labels = _records()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prefix = logits_prefix_model(lambda ids: torch.zeros(*ids.shape, 512))
    with pytest.raises(DataError, match="not one of labels"):
        score_labels(prefix, tokenizer, records, labels[1:], batch_size=4)
    with pytest.raises(DataError, match="batch_size"):
        score_labels(prefix, tokenizer, records, labels, batch_size=0)
    with pytest.raises(DataError, match="max_length=8"):
        score_labels(prefix, tokenizer, records, labels, batch_size=4, max_length=8)
