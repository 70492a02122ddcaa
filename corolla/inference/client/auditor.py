"""What the client asks of a spot checker: told of every span computation a server did for it,
and attached to the router so that nodes it distrusts leave the routes.

`corolla.verify.SpotChecker` is the implementation; the client names only this Protocol, so
the inference layer does not import the verification layer above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypedDict, Unpack

from torch import Tensor, dtype

from corolla.inference.wire.backward import AdapterGrads, BackwardResult

if TYPE_CHECKING:
    from corolla.inference.client.adapter_sync import AdapterSync
    from corolla.inference.client.routing import Hop, Router
    from corolla.inference.client.swarm import Swarm

__all__ = ["HopCall", "WorkAuditor"]


class _Adapter(TypedDict, total=False):
    adapter: AdapterSync | None  # the client's adapter the server applied
    adapter_digest: str  # its content hash ("" for none)


class HopCall(_Adapter, total=False):
    """How the client called the hop: the dtype on the wire, and the adapter the server used."""

    wire_dtype: dtype | None


class WorkAuditor(Protocol):
    """Hooks the client calls after each span computation a server did for it; tensors are (B, T, H)."""

    def attach(self, router: Router) -> None:
        """Keep the nodes it distrusts out of `router`'s routes from now on."""

    def forward_done(self, swarm: Swarm, hop: Hop, hidden: Tensor, output: Tensor, **call: Unpack[HopCall]) -> None:
        """A parallel forward of `hidden` through `hop` returned `output`."""

    def step_done(
        self, swarm: Swarm, hop: Hop, history: Sequence[Tensor], hidden: Tensor, output: Tensor, **call: Unpack[HopCall]
    ) -> None:
        """An inference step of `hidden` after the hop's earlier inputs `history` returned `output`."""

    def backward_done(
        self, swarm: Swarm, hop: Hop, hidden: Tensor, grad_output: Tensor, result: BackwardResult, **call: Unpack[_Back]
    ) -> None:
        """A backward through `hop` of `hidden` and `grad_output` returned `result`."""


class _Back(_Adapter):
    mode: AdapterGrads  # which adapter gradients were asked for
    grad_input: bool  # whether the input gradient was
