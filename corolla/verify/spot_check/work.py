"""One audited span computation as data: how it is re-run elsewhere, compared and hashed.

A `SpanWork` holds what a check needs to redo the primary's work on another server (the
hop, its input, the output gradient for a backward, the adapter weights as they were) and
the primary's outputs as named parts:

- FORWARD: `output` (B, T, H), re-run as a Forward of the same input;
- INFERENCE: `output` (B, T, H) of the step, re-run as a parallel Forward of the hop's whole
  input history up to and including the step, (B, P+T, H), keeping positions P..P+T-1;
- BACKWARD: `grad_input` (B, T, H) when asked for, plus `adapter_grads[names]` (B, adapter
  size: every per-sample gradient, tensors in name order) for PER_SAMPLE, or
  `adapter_grad_norms` (B,): the per-sample gradient norms, square roots of the squared
  norms, for NORMS. A NORMS re-run stores its per-sample gradients on the check server under
  a fresh `audit-...` step id; a ClipSum with zero clip factors consumes them at once (they
  would expire after the server's gradient TTL otherwise), so nothing stays pending there.

`compare_parts` holds every part to the tolerance, except that adapter gradients and norms
are held to the relative L2 bound only: the largest-difference bound was calibrated on
activations and input gradients, whose per-row distribution differs from an adapter's. An
event's comparison carries the largest relative L2 over the parts and the largest
difference over the parts held to it, so it agrees exactly when both are within tolerance.

`tensor_digest` is the canonical hash of named parts: SHA-256 over, for each part in order,
its name (UTF-8), NUL, its dtype name ("float32", "bfloat16", "int64"), NUL, its shape as
comma-separated decimals, NUL, then its elements' raw bytes, contiguous and little-endian
(the byte order of the machines Corolla runs on). Inputs are hashed as the primary received
them (after the wire dtype cast).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from corolla.inference.client.adapter_sync import AdapterSync
from corolla.inference.client.routing import Hop
from corolla.inference.client.swarm import Swarm
from corolla.inference.client.transport import ServerStub
from corolla.inference.discovery import ServerRecord
from corolla.inference.errors import AdapterNotFoundError, InferenceError
from corolla.inference.wire.adapters import adapter_hash
from corolla.inference.wire.backward import AdapterGrads, BackwardResult
from corolla.verify.errors import VerifyError
from corolla.verify.events import Comparison, Run, Subject, Work
from corolla.verify.tolerance import Tolerance, compare

__all__ = [
    "AdapterCopy",
    "Answer",
    "Parts",
    "SpanWork",
    "compare_parts",
    "copy_adapter",
    "precision_of",
    "subject_of",
    "tensor_digest",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Parts = list[tuple[str, torch.Tensor]]  # named outputs (or inputs) of one run, in a fixed order

_SATURATED = sys.float_info.max  # as `tolerance.compare`: "infinitely" apart, still valid JSON


@dataclass(frozen=True, slots=True)
class AdapterCopy:
    """The adapter weights a primary applied on a hop, as they were: what its check applies."""

    digest: str
    tensors: dict[str, torch.Tensor]
    scaling: float


def copy_adapter(sync: AdapterSync, hop: Hop) -> AdapterCopy:
    tensors = {name: t.detach().clone() for name, t in sync.adapter.span(hop.start, hop.end).items()}
    scaling = sync.adapter.scaling
    return AdapterCopy(digest=adapter_hash(tensors, scaling), tensors=tensors, scaling=scaling)


@dataclass(frozen=True, kw_only=True, slots=True)
class SpanWork:
    """One span computation to audit. Tensors are the work's own copies (the caller's may change)."""

    swarm: Swarm
    work: Work
    hop: Hop
    subject: Subject
    hidden: torch.Tensor  # the input a check runs: (B, T, H); INFERENCE: history and step (B, P+T, H)
    inputs: Parts  # what the input hash covers
    primary: Parts  # the primary's outputs
    adapter: AdapterCopy | None
    grad_output: torch.Tensor | None = None  # BACKWARD: (B, T, H)
    first: int = 0  # INFERENCE: the first compared position P
    wire_dtype: torch.dtype | None = None
    mode: AdapterGrads = AdapterGrads.NONE  # BACKWARD: the adapter gradients asked for
    grad_input: bool = False  # BACKWARD: the input gradient was asked for

    @classmethod
    def forward(
        cls,
        swarm: Swarm,
        hop: Hop,
        subject: Subject,
        adapter: AdapterCopy | None,
        hidden: torch.Tensor,
        output: torch.Tensor,
        wire_dtype: torch.dtype | None,
    ) -> SpanWork:
        x = hidden.detach().clone()
        return cls(
            swarm=swarm,
            work=Work.FORWARD,
            hop=hop,
            subject=subject,
            hidden=x,
            inputs=[("hidden", _as_sent(x, wire_dtype))],
            primary=[("output", output.detach().clone())],
            adapter=adapter,
            wire_dtype=wire_dtype,
        )

    @classmethod
    def step(
        cls,
        swarm: Swarm,
        hop: Hop,
        subject: Subject,
        adapter: AdapterCopy | None,
        history: Sequence[torch.Tensor],
        hidden: torch.Tensor,
        output: torch.Tensor,
        wire_dtype: torch.dtype | None,
    ) -> SpanWork:
        full = torch.cat([*history, hidden], dim=1).detach()  # (B, P+T, H)
        first = full.shape[1] - hidden.shape[1]
        positions = torch.arange(first, full.shape[1], dtype=torch.int64)
        return cls(
            swarm=swarm,
            work=Work.INFERENCE,
            hop=hop,
            subject=subject,
            hidden=full,
            inputs=[("hidden", _as_sent(full, wire_dtype)), ("positions", positions)],
            primary=[("output", output.detach().clone())],
            adapter=adapter,
            first=first,
            wire_dtype=wire_dtype,
        )

    @classmethod
    def backward(
        cls,
        swarm: Swarm,
        hop: Hop,
        subject: Subject,
        adapter: AdapterCopy | None,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        result: BackwardResult,
        mode: AdapterGrads,
        grad_input: bool,
    ) -> SpanWork:
        x, g = hidden.detach().clone(), grad_output.detach().clone()
        return cls(
            swarm=swarm,
            work=Work.BACKWARD,
            hop=hop,
            subject=subject,
            hidden=x,
            inputs=[("hidden", x), ("grad_output", g)],
            primary=[(name, t.detach().clone()) for name, t in _backward_parts(result, mode)],
            adapter=adapter,
            grad_output=g,
            mode=mode,
            grad_input=grad_input,
        )

    def rerun(self, stub: ServerStub) -> Parts:
        """The same work on `stub`'s server, as parts comparable with `primary`."""
        model_id, start, end = self.swarm.model_id, self.hop.start, self.hop.end

        def forward(adapter: str) -> Parts:
            out = stub.forward(
                self.hidden, model_id=model_id, start=start, end=end, wire_dtype=self.wire_dtype, adapter=adapter
            )
            return [("output", out[:, self.first :])]

        def backward(adapter: str) -> Parts:
            if self.grad_output is None:
                raise VerifyError("a backward audit without its output gradient")
            step_id = f"audit-{uuid.uuid4().hex}" if self.mode == AdapterGrads.NORMS else ""
            result = stub.backward(
                self.hidden,
                self.grad_output,
                model_id=model_id,
                start=start,
                end=end,
                adapter=adapter,
                adapter_grads=self.mode,
                step_id=step_id,
                grad_input=self.grad_input,
            )
            if step_id:  # consume the per-sample gradients the server keeps for a ClipSum
                try:
                    stub.clip_sum(step_id, torch.zeros(self.hidden.shape[0]))
                except InferenceError as exc:
                    log.info("spot check: could not release audit step on %s (it expires): %s", stub.endpoint, exc)
            return _backward_parts(result, self.mode)

        return _with_adapter(stub, model_id, self.adapter, backward if self.work == Work.BACKWARD else forward)


@dataclass(frozen=True, slots=True)
class Answer:
    """One server's run of the work."""

    record: ServerRecord
    parts: Parts

    @property
    def precision(self) -> str:
        return precision_of(self.record)

    def run(self) -> Run:
        return Run(node_id=self.record.node_id, precision=self.precision, output_sha256=tensor_digest(self.parts))


def precision_of(record: ServerRecord) -> str:
    """A server's precision for tolerances: its weight quantization if any, else its compute dtype."""
    return record.quant or record.dtype


def subject_of(swarm: Swarm, record: ServerRecord) -> Subject:
    """Whose reputation a server's work moves: its node, on the span its record announces."""
    return Subject(node_id=record.node_id, model_id=swarm.model_id, start=record.start, end=record.end)


def tensor_digest(parts: Sequence[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (hex) of named tensors in their canonical encoding (see the module docstring)."""
    h = hashlib.sha256()
    for name, tensor in parts:
        t = tensor.detach().contiguous().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(f"{name}\0{dtype}\0{','.join(str(d) for d in t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compare_parts(a: Parts, b: Parts, tolerance: Tolerance) -> Comparison:
    """All parts compared pairwise; they agree when every part does. The figures are the largest
    relative L2 over the parts and the largest difference over the parts held to it (not the
    adapter's), so they agree exactly when both are within `tolerance`. Different part names
    or shapes disagree outright."""
    if [n for n, _ in a] != [n for n, _ in b] or any(x.shape != y.shape for (_, x), (_, y) in zip(a, b, strict=True)):
        return Comparison(rel_l2=_SATURATED, max_abs=_SATURATED, agree=False)
    relative_only = Tolerance(rel_l2=tolerance.rel_l2, max_abs=_SATURATED)
    rel_l2 = max_abs = 0.0
    agree = True
    for (name, x), (_, y) in zip(a, b, strict=True):
        adapter = name.startswith("adapter_")
        c = compare(x, y, relative_only if adapter else tolerance)
        rel_l2 = max(rel_l2, c.rel_l2)
        max_abs = max_abs if adapter else max(max_abs, c.max_abs)
        agree = agree and c.agree
    return Comparison(rel_l2=rel_l2, max_abs=max_abs, agree=agree)


def _as_sent(tensor: torch.Tensor, wire_dtype: torch.dtype | None) -> torch.Tensor:
    """The tensor as the server received it."""
    return tensor.detach().to(wire_dtype) if wire_dtype is not None else tensor.detach()


def _with_adapter(stub: ServerStub, model_id: str, adapter: AdapterCopy | None, call: Callable[[str], T]) -> T:
    """`call(digest)` with the adapter copy on the server: tried as it is, put on AdapterNotFoundError."""
    if adapter is None:
        return call("")
    try:
        return call(adapter.digest)
    except AdapterNotFoundError:
        stub.put_adapter(adapter.tensors, scaling=adapter.scaling, model_id=model_id, digest=adapter.digest)
        return call(adapter.digest)


def _backward_parts(result: BackwardResult, mode: AdapterGrads) -> Parts:
    parts: Parts = []
    if result.grad_input is not None:
        parts.append(("grad_input", result.grad_input))
    if mode == AdapterGrads.PER_SAMPLE and result.per_sample:
        names = sorted(result.per_sample)
        batch = result.per_sample[names[0]].shape[0]
        flat = torch.cat([result.per_sample[n].reshape(batch, -1) for n in names], dim=1)  # (B, adapter size)
        parts.append(("adapter_grads[" + ",".join(names) + "]", flat))
    if mode == AdapterGrads.NORMS and result.squared_norms is not None:
        parts.append(("adapter_grad_norms", result.squared_norms.clamp(min=0).sqrt()))
    return parts
