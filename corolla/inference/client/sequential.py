"""Parallel forward and backward through the swarm, with failover and autograd.

`RemoteSequential(hidden)` runs blocks `[start, end)` remotely hop by hop; if a server
fails, or does not hold the blocks its record claimed, its node is banned and the rest
of the chain is routed again, so one dead or lying replica costs one retry, not the
request. With `hidden.requires_grad`, the call is an autograd function: backward sends
each hop its input and the output gradient, in reverse.

With an adapter (`RemoteSequential.adapter`), every hop applies the client's LoRA
weights, and `backward_through` can also bring back what DP-SGD needs for them:
per-sample gradients, or per-sample squared norms whose clipped sum `clip_sums` asks
for once the client knows the clip factors (flat clipping).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from corolla.inference.client.adapter_sync import AdapterSync
from corolla.inference.client.auditor import WorkAuditor
from corolla.inference.client.routing import FAILOVER, Hop
from corolla.inference.client.swarm import Swarm
from corolla.inference.errors import RemoteError, RoutingError, StepNotFoundError
from corolla.inference.wire.backward import AdapterGrads, BackwardResult

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HopGrads:
    """One server's backward over `[hop.start, hop.end)`: enough to redo it elsewhere."""

    hop: Hop
    hidden: torch.Tensor  # the hop's forward input (B, T, H)
    grad_output: torch.Tensor  # gradient at its output (B, T, H)
    result: BackwardResult
    step_id: str  # NORMS: the key of the per-sample gradients the server keeps


class RemoteSequential:
    def __init__(
        self, swarm: Swarm, *, num_blocks: int, wire_dtype: torch.dtype | None = None, max_retries: int = 4
    ) -> None:
        self.swarm = swarm
        self.num_blocks = num_blocks
        self.wire_dtype = wire_dtype
        self.max_retries = max_retries
        self.adapter: AdapterSync | None = None  # LoRA weights every hop applies; None = the base model
        self.spot_checker: WorkAuditor | None = None  # audits a sample of every hop's work; None = no checks

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
                y = self._forward(hop, x)
            except FAILOVER as exc:
                failures = self._failed(hop, exc, failures)
                continue
            trace.append((hop, x))
            x, at = y, hop.end
        return x, trace

    def backward_through(
        self,
        trace: list[tuple[Hop, torch.Tensor]],
        grad: torch.Tensor,
        *,
        adapter_grads: AdapterGrads = AdapterGrads.NONE,
        step_id: str = "",
        grad_input: bool = True,
    ) -> tuple[torch.Tensor | None, list[HopGrads]]:
        """Backward through `trace` in reverse. Returns the gradient at the first hop's input
        (None if `grad_input` is False: nobody upstream needs it) and every hop's result."""
        done: list[HopGrads] = []
        g: torch.Tensor | None = grad
        for i in range(len(trace) - 1, -1, -1):
            hop, x = trace[i]
            if g is None:
                raise RemoteError(f"{hop.endpoint}: returned no input gradient")
            g, parts = self._backward_span(
                x,
                g,
                hop.start,
                hop.end,
                preferred=hop,
                adapter_grads=adapter_grads,
                step_id=step_id,
                grad_input=grad_input or i > 0,
            )
            done.extend(parts)
        return g, done

    def clip_sums(self, parts: list[HopGrads], clip_factors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat clipping: each server's sum of `clip_factors[b] * grad[b]`, merged by name.
        A server that died since its NORMS backward is replaced: its backward is redone on
        a replica (same inputs, same result) and the sum asked of that one."""
        sums: dict[str, torch.Tensor] = {}
        for part in parts:
            pending, failures = [part], 0
            while pending:
                item = pending.pop()
                try:
                    sums.update(self.swarm.stub(item.hop.endpoint).clip_sum(item.step_id, clip_factors))
                    continue
                except FAILOVER as exc:  # the server is gone (or lied): ban it
                    failures = self._failed(item.hop, exc, failures)
                except StepNotFoundError:  # it is up but lost the gradients (restart, expiry): no ban
                    failures += 1
                    if failures > self.max_retries:
                        raise
                _, redone = self._backward_span(
                    item.hidden,
                    item.grad_output,
                    item.hop.start,
                    item.hop.end,
                    adapter_grads=AdapterGrads.NORMS,
                    step_id=item.step_id.rsplit("@", 1)[0],
                    grad_input=False,
                )
                _check_same_norms(item, redone)
                pending.extend(redone)
        return sums

    def _backward_span(
        self,
        x: torch.Tensor,
        grad: torch.Tensor,
        start: int,
        end: int,
        *,
        preferred: Hop | None = None,
        adapter_grads: AdapterGrads = AdapterGrads.NONE,
        step_id: str = "",
        grad_input: bool = True,
    ) -> tuple[torch.Tensor | None, list[HopGrads]]:
        hop, failures = preferred, 0
        while True:
            if hop is None:
                route = self.swarm.router.forward_route(start, end)
                if len(route) > 1:  # no single server holds it any more: recompute the inputs
                    _, trace = self.forward_with_trace(x, start, end)
                    return self.backward_through(
                        trace, grad, adapter_grads=adapter_grads, step_id=step_id, grad_input=grad_input
                    )
                hop = route[0]
            hop_step = f"{step_id}@{hop.start}:{hop.end}" if step_id else ""
            try:
                result = self._backward(hop, x, grad, adapter_grads, hop_step, grad_input)
            except FAILOVER as exc:
                failures = self._failed(hop, exc, failures)
                hop = None
                continue
            return result.grad_input, [HopGrads(hop=hop, hidden=x, grad_output=grad, result=result, step_id=hop_step)]

    def _forward(self, hop: Hop, x: torch.Tensor) -> torch.Tensor:
        stub = self.swarm.stub(hop.endpoint)
        used = [""]  # the adapter hash the server applied

        def call(adapter: str) -> torch.Tensor:
            used[0] = adapter
            return stub.forward(
                x,
                model_id=self.swarm.model_id,
                start=hop.start,
                end=hop.end,
                wire_dtype=self.wire_dtype,
                adapter=adapter,
            )

        out: torch.Tensor = self._tracked(hop, lambda: self._with_adapter(stub, hop, call))
        if self.spot_checker is not None:
            self.spot_checker.forward_done(
                self.swarm, hop, x, out, wire_dtype=self.wire_dtype, adapter=self.adapter, adapter_digest=used[0]
            )
        return out

    def _backward(
        self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, mode: AdapterGrads, step_id: str, grad_input: bool
    ) -> BackwardResult:
        stub = self.swarm.stub(hop.endpoint)
        used = [""]

        def call(adapter: str) -> BackwardResult:
            used[0] = adapter
            return stub.backward(
                x,
                grad,
                model_id=self.swarm.model_id,
                start=hop.start,
                end=hop.end,
                adapter=adapter,
                adapter_grads=mode,
                step_id=step_id,
                grad_input=grad_input,
            )

        result: BackwardResult = self._tracked(hop, lambda: self._with_adapter(stub, hop, call))
        if self.spot_checker is not None:
            self.spot_checker.backward_done(
                self.swarm,
                hop,
                x,
                grad,
                result,
                mode=mode,
                grad_input=grad_input,
                adapter=self.adapter,
                adapter_digest=used[0],
            )
        return result

    def _with_adapter(self, stub: Any, hop: Hop, call: Any) -> Any:
        if self.adapter is None:
            return call("")
        return self.adapter.call(stub, hop.start, hop.end, call)

    def _tracked(self, hop: Hop, run: Any) -> Any:
        router = self.swarm.router
        router.begin(hop.endpoint)
        try:
            out = run()
        finally:
            router.finish(hop.endpoint)
        router.bans.succeeded(hop.node_id)
        return out

    def _failed(self, hop: Hop, exc: Exception, failures: int) -> int:
        failures += 1
        self.swarm.router.report_failure(hop, exc, failures=failures, max_retries=self.max_retries)
        return failures


def _check_same_norms(original: HopGrads, redone: list[HopGrads]) -> None:
    """The clip factors came from `original`'s norms; a replica computing other gradients
    (another dtype or quantization) would let a record's clipped contribution exceed the bound."""
    before = original.result.squared_norms
    after = [p.result.squared_norms for p in redone]
    if before is None or any(a is None for a in after):
        return
    total = torch.stack([a for a in after if a is not None]).sum(dim=0)
    if not torch.allclose(total, before, rtol=1e-4, atol=1e-12):
        raise RoutingError(
            f"blocks {original.hop.start}:{original.hop.end}: the replica's per-sample gradient norms differ from "
            "the failed server's (another dtype or quantization?): the clip factors would not bound them; "
            "step abandoned"
        )


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, blocks: RemoteSequential, start: int, end: int) -> torch.Tensor:
        out, trace = blocks.forward_with_trace(hidden, start, end)
        ctx.blocks = blocks
        ctx.trace = trace
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad, _ = ctx.blocks.backward_through(ctx.trace, grad_output.contiguous())
        return grad, None, None, None
