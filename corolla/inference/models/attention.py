"""Causal self-attention over an optional KV cache, shared by every family.

Positions are absolute: `offset` is the position of the first of the `T` new tokens.
With no cache (a parallel forward) `offset` is 0 and the mask is the usual causal one;
with a cache the new queries attend to everything cached before them plus the causal
part of the new tokens (bottom-right aligned), which SDPA's `is_causal` would get wrong
when `T > 1` and `offset > 0` (it aligns top-left), hence the explicit mask there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from corolla.inference.models.kv_cache import LayerCache


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    cache: LayerCache | None,
    offset: int,
) -> torch.Tensor:
    """query `(B, n_heads, T, D)`, key/value `(B, n_kv, T, D)` -> `(B, T, n_heads * D)`."""
    if cache is not None:
        key, value = cache.write(offset, key, value)
    # grouped-query attention (fewer kv heads than query heads) is SDPA's `enable_gqa`
    gqa = query.shape[1] != key.shape[1]
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1:
        out = F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=gqa)
    elif kv_len == q_len:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        rows = torch.arange(q_len, device=query.device).unsqueeze(1) + (kv_len - q_len)
        mask = torch.arange(kv_len, device=query.device).unsqueeze(0) <= rows  # (T, kv_len), True = may attend
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
    batch = out.shape[0]
    return out.transpose(1, 2).reshape(batch, q_len, -1)
