"""Spans and client parts loaded piecewise equal the local transformers model exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from corolla.inference.errors import ModelLoadError
from corolla.inference.models import Checkpoint

ATOL = 1e-5


def _reference(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _run_pieces(checkpoint: Checkpoint, ids: torch.Tensor, splits: list[tuple[int, int]]) -> torch.Tensor:
    client = checkpoint.load_client()
    hidden = client.embed(ids)
    for start, end in splits:
        hidden = checkpoint.load_span(start, end)(hidden)
    return client.head(hidden)


@pytest.mark.parametrize("splits", [[(0, 4)], [(0, 1), (1, 3), (3, 4)]])
def test_pieces_equal_local_model(tiny_model: Path, splits: list[tuple[int, int]]) -> None:
    checkpoint = Checkpoint.open(tiny_model)
    ids = torch.randint(0, 500, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _reference(tiny_model)(ids).logits
        got = _run_pieces(checkpoint, ids, splits)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_cached_steps_equal_full_forward(tiny_model: Path) -> None:
    """Prefill, single-token steps and a multi-token step at an offset (the explicit
    bottom-right causal mask) all agree with one parallel forward."""
    checkpoint = Checkpoint.open(tiny_model)
    client, span = checkpoint.load_client(), checkpoint.load_span(0, 4)
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(2))
    cache = span.new_cache(start=0, end=4, batch_size=2, max_length=16, dtype=torch.float32)
    with torch.no_grad():
        want = client.head(span(client.embed(ids)))
        pieces = [span(client.embed(ids[:, :5]), cache=cache)]
        for t in range(5, 9):
            pieces.append(span(client.embed(ids[:, t : t + 1], t), offset=t, cache=cache))
        pieces.append(span(client.embed(ids[:, 9:], 9), offset=9, cache=cache))
        got = client.head(torch.cat(pieces, dim=1))
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "config",
    [
        Qwen2Config(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        ),
        MistralConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=128,
        ),
    ],
    ids=["qwen2", "mistral"],
)
def test_llama_family_variants(tmp_path: Path, config: object) -> None:
    """Qwen2 (biases on q/k/v) and Mistral (one kv head) load through the Llama family."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    checkpoint = Checkpoint.open(tmp_path)
    assert checkpoint.family.name == "llama"
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            _run_pieces(checkpoint, ids, [(0, 1), (1, 2)]),
            _reference(tmp_path)(ids).logits,
            rtol=0,
            atol=ATOL,
        )


def test_span_loads_only_its_blocks(tiny_llama: Path) -> None:
    checkpoint = Checkpoint.open(tiny_llama)
    span = checkpoint.load_span(1, 3)
    assert len(span.blocks) == 2
    n_params = sum(p.numel() for p in span.parameters())
    per_block = sum(p.numel() for p in checkpoint.load_span(0, 1).parameters())
    assert n_params == 2 * per_block
    client = checkpoint.load_client()
    assert not any("layers" in name for name, _ in client.named_parameters())


def test_missing_or_bad_checkpoints_are_clear(tmp_path: Path, tiny_llama: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        Checkpoint.open(tmp_path)
    with pytest.raises(ModelLoadError, match="not within"):
        Checkpoint.open(tiny_llama).load_span(2, 9)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ModelLoadError, match="not supported"):
        Checkpoint.open(tmp_path)


def test_model_id_tells_different_weights_apart(tmp_path: Path, tiny_llama: Path) -> None:
    from corolla.inference.models import TinySpec, init_tiny

    other = init_tiny(tmp_path / tiny_llama.name, TinySpec(seed=1))
    assert Checkpoint.open(other).model_id != Checkpoint.open(tiny_llama).model_id
    assert Checkpoint.open(tiny_llama).model_id == Checkpoint.open(tiny_llama).model_id
