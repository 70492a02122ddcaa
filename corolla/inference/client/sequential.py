"""Parallel forward and backward through the swarm, with failover and autograd.

`RemoteSequential(hidden)` runs blocks `[start, end)` remotely hop by hop; if a server
fails, it is banned and the rest of the chain is routed again, so one dead replica
costs one retry, not the request. With `hidden.requires_grad`, the call is an autograd
function: backward sends each hop its input and the output gradient, in reverse.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from corolla.inference.client.routing import Hop
from corolla.inference.client.swarm import Swarm
from corolla.inference.errors import RemoteError, RoutingError

log = logging.getLogger(__name__)


class RemoteSequential:
    def __init__(
        self, swarm: Swarm, *, num_blocks: int, wire_dtype: torch.dtype | None = None, max_retries: int = 4
    ) -> None:
        self.swarm = swarm
        self.num_blocks = num_blocks
        self.wire_dtype = wire_dtype
        self.max_retries = max_retries

    def __call__(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = self.num_blocks if end is None else end
        if hidden.requires_grad and torch.is_grad_enabled():
            out: torch.Tensor = _RemoteBlocks.apply(hidden, self, start, end)
            return out
        out, _ = self.forward_with_trace(hidden, start, end)
        return out

    def forward_with_trace(
        self, hidden: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """The output, and each hop with the input it was given (what backward needs)."""
        trace: list[tuple[Hop, torch.Tensor]] = []
        x, at, failures = hidden.detach(), start, 0
        while at < end:
            hop = self.swarm.router.forward_route(at, end)[0]
            try:
                y = self._call(hop, "forward", x)
            except RemoteError as exc:
                failures = self._failed(hop, exc, failures)
                continue
            trace.append((hop, x))
            x, at = y, hop.end
        return x, trace

    def backward_through(self, trace: list[tuple[Hop, torch.Tensor]], grad: torch.Tensor) -> torch.Tensor:
        for hop, x in reversed(trace):
            grad = self._backward_span(x, grad, hop.start, hop.end, preferred=hop)
        return grad

    def _backward_span(
        self,
        x: torch.Tensor,
        grad: torch.Tensor,
        start: int,
        end: int,
        preferred: Hop | None = None,
        failures: int = 0,
    ) -> torch.Tensor:
        hop = preferred
        while True:
            if hop is None:
                route = self.swarm.router.forward_route(start, end)
                if len(route) > 1:  # no single server holds it any more: recompute the inputs
                    _, trace = self.forward_with_trace(x, start, end)
                    return self.backward_through(trace, grad)
                hop = route[0]
            try:
                return self._call(hop, "backward", x, grad)
            except RemoteError as exc:
                failures = self._failed(hop, exc, failures)
                hop = None

    def _call(self, hop: Hop, method: str, x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        stub = self.swarm.stub(hop.endpoint)
        router = self.swarm.router
        router.begin(hop.endpoint)
        try:
            if method == "forward":
                out = stub.forward(
                    x, model_id=self.swarm.model_id, start=hop.start, end=hop.end, wire_dtype=self.wire_dtype
                )
            else:
                if grad is None:
                    raise RoutingError("backward needs a gradient")
                out = stub.backward(x, grad, model_id=self.swarm.model_id, start=hop.start, end=hop.end)
        finally:
            router.finish(hop.endpoint)
        router.bans.succeeded(hop.endpoint)
        return out

    def _failed(self, hop: Hop, exc: Exception, failures: int) -> int:
        failures += 1
        self.swarm.router.report_failure(hop, exc, failures=failures, max_retries=self.max_retries)
        return failures


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, blocks: RemoteSequential, start: int, end: int) -> torch.Tensor:
        out, trace = blocks.forward_with_trace(hidden, start, end)
        ctx.blocks = blocks
        ctx.trace = trace
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad = ctx.blocks.backward_through(ctx.trace, grad_output.contiguous())
        return grad, None, None, None
