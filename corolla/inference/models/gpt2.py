"""The GPT-2 family: LayerNorm, learned absolute positions (added at the embedding, so
blocks need no position input), fused qkv projection.

Hugging Face stores GPT-2 projections as `Conv1D` with `(in, out)` weights; they are
transposed once at load into `nn.Linear`, keeping the module names (`attn.c_attn`,
`mlp.c_fc`, ...) so that PEFT `target_modules` such as `c_attn` mean the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from corolla.inference.models.attention import causal_attention
from corolla.inference.models.family import Block, ClientParts, ModelFamily, linear_from
from corolla.inference.models.kv_cache import LayerCache
from corolla.inference.models.lora import BlockLora


def _conv1d_as_linear(state: Mapping[str, torch.Tensor], name: str) -> nn.Linear:
    return linear_from(state[f"{name}.weight"].t().contiguous(), state.get(f"{name}.bias"))


def _layer_norm(state: Mapping[str, torch.Tensor], name: str, eps: float) -> nn.LayerNorm:
    weight = state[f"{name}.weight"]
    norm = nn.LayerNorm(weight.shape[0], eps=eps, device="meta")
    norm.weight = nn.Parameter(weight, requires_grad=False)
    norm.bias = nn.Parameter(state[f"{name}.bias"], requires_grad=False)
    return norm


class GPT2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, index: int, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.n_heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.n_heads
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(index + 1)
        self.c_attn = _conv1d_as_linear(state, "attn.c_attn")
        self.c_proj = _conv1d_as_linear(state, "attn.c_proj")

    def forward(
        self, x: torch.Tensor, cache: LayerCache | None, offset: int, lora: BlockLora | None = None
    ) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = self.c_attn(x)
        if lora is not None:
            qkv = lora.apply("attn.c_attn", x, qkv)
        q, k, v = qkv.split(hidden, dim=2)
        q, k, v = (t.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = causal_attention(q, k, v, scale=self.scale, cache=cache, offset=offset)
        if lora is not None:
            return lora.apply("attn.c_proj", out, self.c_proj(out))
        return self.c_proj(out)


class GPT2MLP(nn.Module):
    def __init__(self, config: PretrainedConfig, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.c_fc = _conv1d_as_linear(state, "mlp.c_fc")
        self.c_proj = _conv1d_as_linear(state, "mlp.c_proj")
        self.act = ACT2FN[config.activation_function]

    def forward(self, x: torch.Tensor, lora: BlockLora | None = None) -> torch.Tensor:
        if lora is None:
            return self.c_proj(self.act(self.c_fc(x)))
        inner = self.act(lora.apply("mlp.c_fc", x, self.c_fc(x)))
        return lora.apply("mlp.c_proj", inner, self.c_proj(inner))


class GPT2Block(Block):
    def __init__(self, config: PretrainedConfig, index: int, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        eps = float(config.layer_norm_epsilon)
        self.ln_1 = _layer_norm(state, "ln_1", eps)
        self.attn = GPT2Attention(config, index, state)
        self.ln_2 = _layer_norm(state, "ln_2", eps)
        self.mlp = GPT2MLP(config, state)

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        offset: int,
        cache: LayerCache | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), cache, offset, lora)
        return hidden + self.mlp(self.ln_2(hidden), lora)


class GPT2Client(ClientParts):
    def __init__(self, config: PretrainedConfig, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.wte = nn.Embedding.from_pretrained(tensors["wte"], freeze=True)
        self.wpe = nn.Embedding.from_pretrained(tensors["wpe"], freeze=True)
        self.ln_f = _layer_norm(
            {"w.weight": tensors["ln_f.weight"], "w.bias": tensors["ln_f.bias"]},
            "w",
            float(config.layer_norm_epsilon),
        )
        self.lm_head = linear_from(tensors.get("lm_head", tensors["wte"]), None)
        self.max_positions = int(config.n_positions)

    def embed(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.wte(input_ids) + self.wpe(positions)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


class GPT2Family(ModelFamily):
    name = "gpt2"
    model_types = ("gpt2",)

    def num_blocks(self, config: PretrainedConfig) -> int:
        return int(config.n_layer)

    def block_key_prefixes(self, index: int) -> tuple[str, ...]:
        return (f"transformer.h.{index}.", f"h.{index}.")

    def build_block(self, config: PretrainedConfig, index: int, state: Mapping[str, torch.Tensor]) -> Block:
        return GPT2Block(config, index, state)

    def client_keys(self) -> Mapping[str, tuple[str, ...]]:
        return {
            "wte": ("transformer.wte.weight", "wte.weight"),
            "wpe": ("transformer.wpe.weight", "wpe.weight"),
            "ln_f.weight": ("transformer.ln_f.weight", "ln_f.weight"),
            "ln_f.bias": ("transformer.ln_f.bias", "ln_f.bias"),
            "lm_head": ("lm_head.weight",),
        }

    def build_client(self, config: PretrainedConfig, tensors: Mapping[str, torch.Tensor]) -> ClientParts:
        return GPT2Client(config, tensors)

    def lora_modules(self) -> tuple[str, ...]:
        return ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

    def lora_shapes(self, config: PretrainedConfig) -> Mapping[str, tuple[int, int]]:
        hidden = int(config.hidden_size)
        inner = int(getattr(config, "n_inner", None) or 4 * hidden)
        return {
            "attn.c_attn": (hidden, 3 * hidden),
            "attn.c_proj": (hidden, hidden),
            "mlp.c_fc": (hidden, inner),
            "mlp.c_proj": (inner, hidden),
        }

    def kv_heads_and_dim(self, config: PretrainedConfig) -> tuple[int, int]:
        n_heads = int(config.num_attention_heads)
        return n_heads, int(config.hidden_size) // n_heads
