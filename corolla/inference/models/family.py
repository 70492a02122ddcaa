"""What every model family provides: its blocks, its client parts, where its weights live.

A family is the small per-architecture part of Corolla. Everything else (loading a
span from safetensors, caches, the wire, routing) is shared. Families register the
Hugging Face `model_type`s they serve in `corolla.inference.models.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.inference.models.kv_cache import LayerCache
from corolla.inference.models.lora import BlockLora

# (offset, length, dtype, device) -> (cos, sin), each (1, length, head_dim) on `device`
PositionEncoder = Callable[[int, int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]]


class Block(nn.Module, ABC):
    """One transformer block. `hidden` is `(B, T, H)`; `offset` is the absolute position
    of its first token; `rope` is the family's precomputed position encoding, if any;
    `lora` adds an adapter's low-rank terms to the projections it names."""

    @abstractmethod
    def forward(
        self,
        hidden: torch.Tensor,
        *,
        offset: int,
        cache: LayerCache | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        lora: BlockLora | None = None,
    ) -> torch.Tensor: ...


class ClientParts(nn.Module, ABC):
    """What a client keeps at home: token (and position) embeddings, final norm, LM head."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """`(B, T)` token ids at positions `offset..offset+T` -> `(B, T, H)` hidden states."""

    @abstractmethod
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(B, T, H)` last hidden states -> `(B, T, V)` logits."""


class ModelFamily(ABC):
    """The per-architecture hooks. Stateless: one instance serves every checkpoint."""

    name: str
    model_types: tuple[str, ...]

    @abstractmethod
    def num_blocks(self, config: PretrainedConfig) -> int: ...

    @abstractmethod
    def block_key_prefixes(self, index: int) -> tuple[str, ...]:
        """Candidate checkpoint key prefixes of block `index` (e.g. `model.layers.3.`)."""

    @abstractmethod
    def build_block(self, config: PretrainedConfig, index: int, state: Mapping[str, torch.Tensor]) -> Block:
        """A block holding `state` (checkpoint tensors with the block prefix stripped)."""

    @abstractmethod
    def client_keys(self) -> Mapping[str, tuple[str, ...]]:
        """Logical name of each client tensor -> its candidate checkpoint keys (first found
        wins). A tensor missing from the checkpoint is left out (e.g. a tied LM head)."""

    @abstractmethod
    def build_client(self, config: PretrainedConfig, tensors: Mapping[str, torch.Tensor]) -> ClientParts:
        """Client parts from the tensors of `client_keys`, keyed by logical name."""

    @abstractmethod
    def kv_heads_and_dim(self, config: PretrainedConfig) -> tuple[int, int]:
        """`(n_kv_heads, head_dim)`: the shape of one token's cache entry per layer."""

    @abstractmethod
    def lora_modules(self) -> tuple[str, ...]:
        """Module paths inside a block (Hugging Face names) that may carry LoRA weights."""

    @abstractmethod
    def lora_shapes(self, config: PretrainedConfig) -> Mapping[str, tuple[int, int]]:
        """`(in_features, out_features)` of each module of `lora_modules`."""

    def hidden_size(self, config: PretrainedConfig) -> int:
        return int(config.hidden_size)

    def position_encoder(self, config: PretrainedConfig) -> PositionEncoder | None:
        """Position encoding applied inside the blocks, for `length` positions from `offset`;
        None if the family adds positions at the embedding instead."""
        return None


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An `nn.Linear` holding exactly these tensors (no random init, no copy)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer
