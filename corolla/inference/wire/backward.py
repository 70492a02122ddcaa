"""What a Backward call returns, shared by both ends of the wire (the server computes it, the
client and the spot checker read it): which adapter gradients were asked for, and the result."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

__all__ = ["AdapterGrads", "BackwardResult"]


class AdapterGrads(IntEnum):
    """What backward returns for the adapter's weights (values as in blocks.proto)."""

    NONE = 0  # input gradient only
    PER_SAMPLE = 1  # (B, *shape) per weight
    NORMS = 2  # per-sample squared norms (B,); the per-sample gradients are kept for clip_sum


@dataclass(frozen=True, slots=True)
class BackwardResult:
    grad_input: torch.Tensor | None  # (B, T, H), None when not asked for
    per_sample: dict[str, torch.Tensor]  # adapter tensor name -> (B, *shape) float32; empty for NONE
    squared_norms: torch.Tensor | None  # (B,) float32 for NORMS
