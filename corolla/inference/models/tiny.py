"""`platform model init-tiny`: a small random checkpoint with a locally trained tokenizer.

Everything in Corolla must run without the model hub, so tests, the quick start and
the benchmarks make their models here: a config, random weights from a seed,
`save_pretrained` into a directory, and a byte-level BPE tokenizer trained with the
`tokenizers` library on a small shipped corpus. The result loads with the ordinary
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

from corolla.inference.errors import ModelLoadError

Arch = Literal["llama", "gpt2"]
ARCHES: tuple[Arch, ...] = ("llama", "gpt2")

_SPECIAL = ["<|endoftext|>", "<|pad|>"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TinySpec:
    arch: Arch = "llama"
    hidden_size: int = 64  # model width
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 2  # Llama only: grouped-query attention when < num_heads
    intermediate_size: int = 128  # MLP width (Llama; GPT-2 uses 4 x hidden)
    vocab_size: int = 512  # BPE vocabulary trained on the shipped corpus
    max_positions: int = 1024  # longest sequence
    seed: int = 0  # weights are a function of the spec and this seed

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ModelLoadError(f"arch={self.arch!r} is not one of {', '.join(ARCHES)}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "max_positions"):
            if getattr(self, name) < 1:
                raise ModelLoadError(f"{name}={getattr(self, name)} must be at least 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, "
                f"and num_heads by num_kv_heads={self.num_kv_heads}"
            )
        if self.vocab_size < 300:
            raise ModelLoadError(f"vocab_size={self.vocab_size} must be at least 300 (256 bytes + specials)")


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the shipped corpus: deterministic, any text encodes."""
    corpus = resources.files("corolla.inference.models").joinpath("data/tiny_corpus.txt").read_text()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=_SPECIAL[0], bos_token=_SPECIAL[0], pad_token=_SPECIAL[1]
    )


def init_tiny(directory: str | Path, spec: TinySpec | None = None, *, overwrite: bool = True) -> Path:
    """Write a random-initialised checkpoint of `spec` and its tokenizer into `directory`;
    with `overwrite=False` a directory that already holds a checkpoint is refused
    (`ModelLoadError`), as is one that cannot be written."""
    spec = spec or TinySpec()
    out = Path(directory).expanduser()
    if not overwrite and out.is_dir() and any((out / name).exists() for name in _CHECKPOINT_FILES):
        raise ModelLoadError(f"{str(out)!r} already holds a checkpoint; give --force to overwrite it")
    try:
        _write_tiny(out, spec)
    except OSError as exc:
        where = exc.filename or out
        raise ModelLoadError(f"cannot write a checkpoint to {str(where)!r}: {exc.strerror or exc}") from None
    return out


# Files whose presence means a directory already holds a checkpoint.
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _write_tiny(out: Path, spec: TinySpec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec.vocab_size)
    vocab = len(tokenizer)
    common = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config: PretrainedConfig
    if spec.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=False,
            **common,
        )
    else:
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_positions=spec.max_positions,
            **common,
        )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    # With Hugging Face's init (weights ~ N(0, 0.02)) and a unit final norm, a random model's
    # logits are bounded by about 0.02 * hidden_size (+-1.3 at width 64): no adapter could then
    # make a confident prediction (fine-tuning stalls at a loss near ln(vocab)). Scaling the
    # final norm gives logits of unit spread, as a trained model has.
    final_norm = model.model.norm if spec.arch == "llama" else model.transformer.ln_f
    with torch.no_grad():
        final_norm.weight.fill_(1.0 / (config.initializer_range * spec.hidden_size**0.5))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
