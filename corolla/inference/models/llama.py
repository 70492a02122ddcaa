"""The Llama family: Llama, Mistral, Qwen2 (RMSNorm, rotary positions, gated MLP, GQA).

Module names match Hugging Face's (`self_attn.q_proj`, `mlp.down_proj`, ...) so that
checkpoint keys load unchanged and PEFT `target_modules` mean the same thing here.
Biases are taken from the checkpoint: Qwen2 has them on q/k/v, Llama on none.
Mistral's sliding window is not applied (it only matters past the window length).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from corolla.inference.models.attention import causal_attention
from corolla.inference.models.family import Block, ClientParts, ModelFamily, PositionEncoder, linear_from
from corolla.inference.models.kv_cache import LayerCache
from corolla.inference.models.lora import BlockLora

# rope types whose frequencies change with the sequence length: computed per call
_LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as Hugging Face does (exact match)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused kernel; equal to the formula below within float32 rounding
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(state: Mapping[str, torch.Tensor], name: str) -> nn.Linear:
    return linear_from(state[f"{name}.weight"], state.get(f"{name}.bias"))


class _Fused:
    """Several projections of the same input as one matmul (a decode step is a few
    dozen tiny kernels, so each one saved counts). The projections stay separate
    `nn.Linear` modules, with HF names, whose weights are views of the fused tensor:
    no extra memory. When a module is replaced (quantization) the fused tensor is
    released at once (`release`, called by `_FusedOwner`), so a quantized block never
    keeps its float weights; when the modules are moved or cast (`.to(device)`, which
    copies each view on its own), `refuse` rebuilds the fused tensor from them."""

    def __init__(self, state: Mapping[str, torch.Tensor], names: list[str]) -> None:
        weights = [state[f"{n}.weight"] for n in names]
        biases = [state.get(f"{n}.bias") for n in names]
        self.sizes = [w.shape[0] for w in weights]
        self.weight: torch.Tensor | None = torch.cat(weights)
        self.bias = torch.cat(biases) if all(b is not None for b in biases) else None  # type: ignore[arg-type]
        self.fusable = all(b is None for b in biases) or self.bias is not None
        self.modules: list[nn.Linear] = []
        start = 0
        for size, bias in zip(self.sizes, biases, strict=True):
            view_bias = self.bias[start : start + size] if self.bias is not None else bias
            self.modules.append(linear_from(self.weight[start : start + size], view_bias))
            start += size

    def __call__(self, x: torch.Tensor, current: list[nn.Module]) -> list[torch.Tensor]:
        if self.fusable and self.weight is not None and all(a is b for a, b in zip(current, self.modules, strict=True)):
            return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))
        self.release()
        return [m(x) for m in current]

    def release(self) -> None:
        """Stop fusing and drop every reference to the original modules and their weights."""
        self.fusable = False
        self.weight = self.bias = None
        self.modules = []

    def refuse(self) -> None:
        """Make the modules' weights views of one fused tensor again, after `.to()` split them."""
        if not self.fusable:
            return
        with torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in self.modules])
            for module, view in zip(self.modules, self.weight.split(self.sizes), strict=True):
                module.weight.data = view
            if self.bias is not None:
                self.bias = torch.cat([m.bias.detach() for m in self.modules if m.bias is not None])
                for module, view in zip(self.modules, self.bias.split(self.sizes), strict=True):
                    module.bias.data = view


class _FusedOwner(nn.Module):
    """A module holding `_Fused` groups: replacing one of their modules releases the group,
    and `.to()` / `.cuda()` / `.half()` rebuild each group's fused tensor on the new device."""

    _FUSED: ClassVar[dict[str, str]] = {}  # module attribute -> the attribute of its `_Fused` group

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        fused = self.__dict__.get(self._FUSED.get(name, ""))
        if isinstance(fused, _Fused) and fused.modules and not any(value is m for m in fused.modules):
            fused.release()

    def _apply(self, fn: Any, recurse: bool = True) -> _FusedOwner:
        super()._apply(fn, recurse)
        for group in set(self._FUSED.values()):
            fused = self.__dict__.get(group)
            if isinstance(fused, _Fused):
                fused.refuse()
        return self


class LlamaAttention(_FusedOwner):
    _FUSED: ClassVar[dict[str, str]] = {"q_proj": "_qkv", "k_proj": "_qkv", "v_proj": "_qkv"}

    def __init__(self, config: PretrainedConfig, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self._qkv = _Fused(state, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
        self.q_proj, self.k_proj, self.v_proj = self._qkv.modules
        self.o_proj = _linear(state, "self_attn.o_proj")

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        offset: int,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self._qkv(x, [self.q_proj, self.k_proj, self.v_proj])
        if lora is not None:
            q = lora.apply("self_attn.q_proj", x, q)
            k = lora.apply("self_attn.k_proj", x, k)
            v = lora.apply("self_attn.v_proj", x, v)
        q = q.view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, D)
        k = k.view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, D)
        v = v.view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rope)  # (1, 1, T, D)
        qk = torch.cat((q, k), dim=1)  # rotate queries and keys in one pass: (B, nh + nkv, T, D)
        q, k = (qk * cos + _rotate_half(qk) * sin).split([q.shape[1], k.shape[1]], dim=1)
        out = causal_attention(q, k, v, scale=self.head_dim**-0.5, cache=cache, offset=offset)
        if lora is not None:
            return lora.apply("self_attn.o_proj", out, self.o_proj(out))
        return self.o_proj(out)


class LlamaMLP(_FusedOwner):
    _FUSED: ClassVar[dict[str, str]] = {"gate_proj": "_gate_up", "up_proj": "_gate_up"}

    def __init__(self, config: PretrainedConfig, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self._gate_up = _Fused(state, ["mlp.gate_proj", "mlp.up_proj"])
        self.gate_proj, self.up_proj = self._gate_up.modules
        self.down_proj = _linear(state, "mlp.down_proj")
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, lora: BlockLora | None = None) -> torch.Tensor:
        gate, up = self._gate_up(x, [self.gate_proj, self.up_proj])
        if lora is None:
            return self.down_proj(self.act_fn(gate) * up)
        gate = lora.apply("mlp.gate_proj", x, gate)
        up = lora.apply("mlp.up_proj", x, up)
        inner = self.act_fn(gate) * up
        return lora.apply("mlp.down_proj", inner, self.down_proj(inner))


class LlamaBlock(Block):
    def __init__(self, config: PretrainedConfig, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        eps = float(config.rms_norm_eps)
        self.input_layernorm = RMSNorm(state["input_layernorm.weight"], eps)
        self.self_attn = LlamaAttention(config, state)
        self.post_attention_layernorm = RMSNorm(state["post_attention_layernorm.weight"], eps)
        self.mlp = LlamaMLP(config, state)

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        offset: int,
        cache: LayerCache | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        lora: BlockLora | None = None,
    ) -> torch.Tensor:
        if rope is None:
            raise ValueError("Llama blocks need rotary position embeddings")
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, cache, offset, lora)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), lora)


class LlamaClient(ClientParts):
    def __init__(self, config: PretrainedConfig, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(tensors["embed"], freeze=True)
        self.norm = RMSNorm(tensors["norm"], float(config.rms_norm_eps))
        head = tensors.get("lm_head", tensors["embed"])  # tied when the checkpoint has no head
        self.lm_head = linear_from(head, None)

    def embed(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


class LlamaFamily(ModelFamily):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def num_blocks(self, config: PretrainedConfig) -> int:
        return int(config.num_hidden_layers)

    def block_key_prefixes(self, index: int) -> tuple[str, ...]:
        return (f"model.layers.{index}.", f"layers.{index}.")

    def build_block(self, config: PretrainedConfig, index: int, state: Mapping[str, torch.Tensor]) -> Block:
        return LlamaBlock(config, state)

    def client_keys(self) -> Mapping[str, tuple[str, ...]]:
        return {
            "embed": ("model.embed_tokens.weight", "embed_tokens.weight"),
            "norm": ("model.norm.weight", "norm.weight"),
            "lm_head": ("lm_head.weight",),
        }

    def build_client(self, config: PretrainedConfig, tensors: Mapping[str, torch.Tensor]) -> ClientParts:
        return LlamaClient(config, tensors)

    def lora_modules(self) -> tuple[str, ...]:
        return tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))

    def lora_shapes(self, config: PretrainedConfig) -> Mapping[str, tuple[int, int]]:
        hidden, inner = int(config.hidden_size), int(config.intermediate_size)
        n_kv, head_dim = self.kv_heads_and_dim(config)
        q_out = int(config.num_attention_heads) * head_dim
        return {
            "self_attn.q_proj": (hidden, q_out),
            "self_attn.k_proj": (hidden, n_kv * head_dim),
            "self_attn.v_proj": (hidden, n_kv * head_dim),
            "self_attn.o_proj": (q_out, hidden),
            "mlp.gate_proj": (hidden, inner),
            "mlp.up_proj": (hidden, inner),
            "mlp.down_proj": (inner, hidden),
        }

    def kv_heads_and_dim(self, config: PretrainedConfig) -> tuple[int, int]:
        n_heads = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
        return n_kv, head_dim

    def position_encoder(self, config: PretrainedConfig) -> PositionEncoder:
        rotary = LlamaRotaryEmbedding(config)  # type: ignore[arg-type]  # Hugging Face's: it knows every rope scaling type

        def encode(
            offset: int, length: int, dtype: torch.dtype, device: torch.device
        ) -> tuple[torch.Tensor, torch.Tensor]:
            positions = torch.arange(offset, offset + length).unsqueeze(0)
            cos, sin = rotary(torch.empty(0, dtype=dtype), positions)  # each (1, T, D), computed on cpu
            return cos.to(device), sin.to(device)

        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in _LENGTH_DEPENDENT_ROPE:
            return encode
        # Static rope types: one table for every position, sliced per call (a decode step
        # then costs two slices instead of a dozen small kernels).
        tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        max_positions = int(config.max_position_embeddings)

        def lookup(
            offset: int, length: int, dtype: torch.dtype, device: torch.device
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if offset + length > max_positions:
                return encode(offset, length, dtype, device)
            key = (dtype, device)
            if key not in tables:  # a plain tensor even if first asked for in inference mode (backward saves it)
                with torch.inference_mode(False), torch.no_grad():
                    tables[key] = encode(0, max_positions, dtype, device)
            cos, sin = tables[key]
            return cos[:, offset : offset + length], sin[:, offset : offset + length]

        return lookup
