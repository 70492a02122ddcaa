"""What the client asks of a spot checker: told of every span computation a server did for it,
and attached to the router so that nodes it distrusts leave the routes.

`corolla.verify.SpotChecker` is the implementation; the client names only this Protocol, so
the inference layer does not import the verification layer above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from corolla.inference.wire.backward import AdapterGrads, BackwardResult

if TYPE_CHECKING:
    from corolla.inference.client.adapter_sync import AdapterSync
    from corolla.inference.client.routing import Hop, Router
    from corolla.inference.client.swarm import Swarm

__all__ = ["WorkAuditor"]


class WorkAuditor(Protocol):
    def attach(self, router: Router) -> None:
        """Keep the nodes it distrusts out of `router`'s routes from now on."""

    def forward_done(
        self,
        swarm: Swarm,
        hop: Hop,
        hidden: torch.Tensor,
        output: torch.Tensor,
        *,
        wire_dtype: torch.dtype | None = None,
        adapter: AdapterSync | None = None,
        adapter_digest: str = "",
    ) -> None:
        """A parallel forward of `hidden` (B, T, H) through `hop` returned `output`."""

    def step_done(
        self,
        swarm: Swarm,
        hop: Hop,
        history: Sequence[torch.Tensor],
        hidden: torch.Tensor,
        output: torch.Tensor,
        *,
        wire_dtype: torch.dtype | None = None,
        adapter: AdapterSync | None = None,
        adapter_digest: str = "",
    ) -> None:
        """An inference step of `hidden` (B, T, H) after the hop's earlier inputs `history` returned `output`."""

    def backward_done(
        self,
        swarm: Swarm,
        hop: Hop,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        result: BackwardResult,
        *,
        mode: AdapterGrads,
        grad_input: bool,
        adapter: AdapterSync | None = None,
        adapter_digest: str = "",
    ) -> None:
        """A backward through `hop` of `hidden` and `grad_output` (both (B, T, H)) in `mode` returned `result`."""
