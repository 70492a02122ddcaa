"""LoRA adapters applied functionally by the blocks: `y = base(x) + scaling * B A x`.

The base weights never change: a request brings the adapter (or names one the server
holds), and each target projection adds its low-rank term. This is PEFT's LoRA
(`lora_B(lora_A(x)) * scaling`, no dropout), so an adapter trained through the swarm
loads into `peft.PeftModel` unchanged and gives the same outputs.

Weights are either shared by the batch, `A (r, in)` and `B (out, r)`, or per sample,
`A (N, r, in)` and `B (N, out, r)`: a server computing per-sample gradients for DP-SGD
gives every sample its own copy, so that the gradient of each copy is that sample's.
Names are module paths inside a block as Hugging Face writes them (`self_attn.q_proj`);
PEFT's `target_modules` match them by suffix (`q_proj`, or `c_proj` for both of GPT-2's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["BlockLora", "SpanAdapter", "match_targets"]


class BlockLora:
    """The LoRA pairs of one block. `apply` adds the term of `name` to a projection's output."""

    __slots__ = ("pairs", "scaling")

    def __init__(self, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        self.pairs = pairs
        self.scaling = scaling

    def apply(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x `(N, T, in)`, y `(N, T, out)` = the base projection of x."""
        pair = self.pairs.get(name)
        if pair is None:
            return y
        a, b = pair
        x = x.to(a.dtype)
        # per-sample weights (3-D): sample n uses a[n] and b[n]
        delta = (x @ a.t()) @ b.t() if a.dim() == 2 else torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        return y + (delta * self.scaling).to(y.dtype)


@dataclass(frozen=True, slots=True)
class SpanAdapter:
    """An adapter's pairs for the blocks of one span, keyed by absolute block index."""

    scaling: float
    blocks: Mapping[int, BlockLora]

    def block(self, index: int) -> BlockLora | None:
        return self.blocks.get(index)

    def numel(self, start: int, end: int) -> int:
        """Weights in blocks `[start, end)`."""
        return sum(
            a.numel() + b.numel() for i, blk in self.blocks.items() if start <= i < end for a, b in blk.pairs.values()
        )

    @classmethod
    def from_pairs(
        cls, pairs: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scaling: float
    ) -> SpanAdapter:
        grouped: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (index, name), pair in pairs.items():
            grouped.setdefault(index, {})[name] = pair
        return cls(scaling=scaling, blocks={i: BlockLora(p, scaling) for i, p in grouped.items()})


def match_targets(module_names: Iterable[str], targets: Iterable[str]) -> list[str]:
    """The block's module paths that PEFT-style `targets` select: equal, or ending in `.target`."""
    wanted = tuple(targets)
    return [m for m in module_names if any(m == t or m.endswith(f".{t}") for t in wanted)]
