"""Preallocated key/value caches for the blocks of a span.

A server allocates a session's whole cache when the session opens, sized by the
`max_length` the client asked for, so that the memory budget is checked once and a
session can never grow past what was admitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LayerCache:
    """Keys and values of one attention layer: each `(B, n_kv_heads, max_length, head_dim)`."""

    keys: torch.Tensor
    values: torch.Tensor

    def write(self, offset: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `(B, n_kv, T, D)` keys/values at positions `offset..offset+T` and return the
        cache up to `offset+T`, ready for attention."""
        end = offset + keys.shape[2]
        self.keys[:, :, offset:end] = keys
        self.values[:, :, offset:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]


class SpanCache:
    """The caches of every block of one span for one session."""

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        """Allocated on `device`, the span's: the blocks write and read it there."""
        shape = (batch_size, n_kv_heads, max_length, head_dim)
        self.layers = [
            LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(n_layers)
        ]
        self.max_length = max_length
        self.batch_size = batch_size

    @staticmethod
    def nbytes_for(
        *, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_length: int, dtype: torch.dtype
    ) -> int:
        """Bytes a cache of this size takes, computed before allocating it."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * batch_size * n_kv_heads * max_length * head_dim * itemsize
