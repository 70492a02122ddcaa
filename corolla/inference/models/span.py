"""A contiguous run of blocks `[start, end)` as one module, with or without a KV cache."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from corolla.inference.models.family import Block, ModelFamily
from corolla.inference.models.kv_cache import SpanCache
from corolla.inference.models.lora import SpanAdapter


class Span(nn.Module):
    """Blocks `start..end-1` of one model. A request may use any sub-span of it."""

    def __init__(
        self, *, family: ModelFamily, config: PretrainedConfig, start: int, end: int, blocks: list[Block]
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.start = start
        self.end = end
        self.blocks = nn.ModuleList(blocks)
        self._encode_positions = family.position_encoder(config)

    @property
    def device(self) -> torch.device:
        """Where the blocks' weights live (every block on one device)."""
        return next(p.device for p in self.parameters())

    def new_cache(self, *, start: int, end: int, batch_size: int, max_length: int, dtype: torch.dtype) -> SpanCache:
        """A KV cache for blocks `[start, end)`, on the span's device."""
        n_kv, head_dim = self.family.kv_heads_and_dim(self.config)
        return SpanCache(
            n_layers=end - start,
            batch_size=batch_size,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            max_length=max_length,
            dtype=dtype,
            device=self.device,
        )

    def cache_bytes(self, *, start: int, end: int, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
        n_kv, head_dim = self.family.kv_heads_and_dim(self.config)
        return SpanCache.nbytes_for(
            n_layers=end - start,
            batch_size=batch_size,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            max_length=max_length,
            dtype=dtype,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        start: int | None = None,
        end: int | None = None,
        offset: int = 0,
        cache: SpanCache | None = None,
        adapter: SpanAdapter | None = None,
    ) -> torch.Tensor:
        """`(B, T, H)` -> `(B, T, H)` through blocks `[start, end)` (default: all), the
        first token at absolute position `offset`. `cache` must cover exactly `[start, end)`;
        `adapter` holds LoRA pairs by absolute block index."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        rope = None
        if self._encode_positions is not None:
            rope = self._encode_positions(offset, hidden.shape[1], hidden.dtype, hidden.device)
        for i, block in enumerate(self.blocks[start - self.start : end - self.start]):
            layer_cache = cache.layers[i] if cache is not None else None
            lora = adapter.block(start + i) if adapter is not None else None
            hidden = block(hidden, offset=offset, cache=layer_cache, rope=rope, lora=lora)
        return hidden
