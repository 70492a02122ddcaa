"""The one mean of a round: the uniform mean of the sites' updates.

Uniform, not weighted by record counts (that would reveal them). Computed in float64 and
returned as float32, whether the coordinator sums the updates itself (`mean_update`, a round
in the clear) or secure aggregation hands it only the sum (`mean_of_sum`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from corolla.federation.messages import Weights

__all__ = ["mean_of_sum", "mean_update"]


def mean_of_sum(total: npt.NDArray[np.floating], count: int) -> npt.NDArray[np.float32]:
    """`total / count` as float32 (the division in float64)."""
    if count < 1:
        raise ValueError(f"a mean of {count} updates")
    return (np.asarray(total, dtype=np.float64) / count).astype(np.float32)


def mean_update(updates: list[Weights]) -> Weights:
    """The uniform mean of the updates, tensor by tensor."""
    if not updates:
        raise ValueError("mean_update needs at least one update")
    first = updates[0]
    for update in updates[1:]:
        if update.keys() != first.keys() or any(update[k].shape != first[k].shape for k in first):
            raise ValueError("updates differ in names or shapes")
    out: Weights = {}
    for name in first:
        total = np.zeros(first[name].shape, dtype=np.float64)
        for update in updates:
            total += update[name]
        out[name] = mean_of_sum(total, len(updates))
    return out
