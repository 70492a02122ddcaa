"""Inference sessions through a chain of servers, with failover that keeps the output.

Each hop of the chain holds a server-side KV cache. The client keeps, per hop, every
input it sent, so when a server dies mid-generation its blocks are routed again (to
one or several servers), the kept inputs are replayed there to rebuild the caches,
and the step goes on: the tokens that come out are the ones the dead server would
have produced. A server that turns out not to hold the blocks (or the model) its record
claimed is treated the same way, and its node is reported as a liar (`Router.report_failure`).
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from corolla.inference.client.adapter_sync import AdapterSync
from corolla.inference.client.auditor import WorkAuditor
from corolla.inference.client.routing import FAILOVER, Hop
from corolla.inference.client.swarm import Swarm
from corolla.inference.client.transport import SessionStream
from corolla.inference.errors import InferenceError, MaxLengthExceededError, RoutingError

log = logging.getLogger(__name__)


@dataclass
class _Link:
    hop: Hop
    stream: SessionStream
    inputs: list[torch.Tensor] = field(default_factory=list)  # each (B, T_i, H), in order sent


class InferenceSession:
    """Steps of `(B, T, H)` hidden states through blocks `[start, end)`, cached remotely."""

    def __init__(
        self,
        swarm: Swarm,
        *,
        start: int,
        end: int,
        max_length: int,
        batch_size: int = 1,
        wire_dtype: torch.dtype | None = None,
        max_retries: int = 4,
        adapter: AdapterSync | None = None,
        spot_checker: WorkAuditor | None = None,
    ) -> None:
        self.swarm = swarm
        self.spot_checker = spot_checker  # audits a sample of the steps (by a parallel forward of the history)
        self.adapter = adapter  # LoRA weights each server applies, put there before its session opens
        self.start = start
        self.end = end
        self.max_length = max_length
        self.batch_size = batch_size
        self.wire_dtype = wire_dtype
        self.max_retries = max_retries
        self.position = 0
        self._links: list[_Link] = []
        self._closed = False
        self._links = self._open_chain(start, end)

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._closed:
            raise RoutingError("the inference session is closed")
        if self.position + hidden.shape[1] > self.max_length:
            raise MaxLengthExceededError(
                f"{self.position + hidden.shape[1]} tokens would exceed the session's max_length {self.max_length}"
            )
        x = hidden.detach()
        self._leave_excluded()
        i, failures = 0, 0
        while i < len(self._links):
            link = self._links[i]
            try:
                y = link.stream.step(x, self.position, wire_dtype=self.wire_dtype)
            except FAILOVER as exc:
                failures += 1
                self._replace(i, exc, failures)
                continue  # retry the same blocks on the replacement links
            self.swarm.router.bans.succeeded(link.hop.node_id)
            if self.spot_checker is not None:
                self.spot_checker.step_done(
                    self.swarm,
                    link.hop,
                    link.inputs,
                    x,
                    y,
                    wire_dtype=self.wire_dtype,
                    adapter=self.adapter,
                    adapter_digest=link.stream.adapter,
                )
            link.inputs.append(x)
            x = y
            i += 1
        self.position += hidden.shape[1]
        return x

    def rewind(self, position: int) -> None:
        """Go back to `position` tokens: the next step continues from there and the servers
        overwrite their caches past it (scoring several continuations of one prompt). The inputs
        kept for failover replay and audits are cut to the same length (a new list: an audit
        already given the old history keeps it)."""
        if not 0 <= position <= self.position:
            raise InferenceError(f"cannot rewind to position {position}: the session holds {self.position} tokens")
        if position < self.position:
            for link in self._links:
                kept = torch.cat(link.inputs, dim=1)[:, :position] if link.inputs else None
                link.inputs = [kept] if kept is not None and kept.shape[1] else []
        self.position = position

    @property
    def route(self) -> list[Hop]:
        return [link.hop for link in self._links]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for link in self._links:
                link.stream.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- failover ----------------------------------------------------------------------------

    def _open_chain(self, start: int, end: int) -> list[_Link]:
        failures = 0
        while True:
            route = self.swarm.router.generation_route(start, end)
            # all hops at once: a session costs one round trip to open, not one per hop
            with ThreadPoolExecutor(max_workers=len(route)) as pool:
                opened = list(pool.map(self._try_open, route))
            failed = [
                (hop, result) for hop, result in zip(route, opened, strict=True) if isinstance(result, InferenceError)
            ]
            if not failed:
                return [_Link(hop, stream) for hop, stream in zip(route, opened, strict=True)]  # type: ignore[arg-type]
            for result in opened:
                if isinstance(result, SessionStream):
                    result.close()
            for hop, exc in failed:
                failures += 1
                self._ban(hop, exc, failures)

    def _try_open(self, hop: Hop) -> SessionStream | InferenceError:
        try:
            return self._open(hop)
        except FAILOVER as exc:
            return exc

    def _open(self, hop: Hop) -> SessionStream:
        stub = self.swarm.stub(hop.endpoint)

        def open_with(adapter: str) -> SessionStream:
            return stub.open_session(
                session_id=uuid.uuid4().hex,
                model_id=self.swarm.model_id,
                start=hop.start,
                end=hop.end,
                max_length=self.max_length,
                batch_size=self.batch_size,
                adapter=adapter,
            )

        return open_with("") if self.adapter is None else self.adapter.call(stub, hop.start, hop.end, open_with)

    def _leave_excluded(self) -> None:
        """Move off servers the router now excludes (quarantined by spot checks) mid-session:
        their blocks go to a new chain that replays the history, as in failover."""
        exclude = self.swarm.router.exclude
        if exclude is None:
            return
        for i in range(len(self._links) - 1, -1, -1):
            if exclude(self._links[i].hop.record):
                self._replace(i, RoutingError(f"{self._links[i].hop.endpoint} is quarantined"), 0, ban=False)

    def _replace(self, index: int, exc: Exception, failures: int, *, ban: bool = True) -> None:
        """Swap link `index` for a new chain over its blocks, replaying its inputs there."""
        old = self._links[index]
        old.stream.close()
        if ban:
            self._ban(old.hop, exc, failures)
        while True:
            links = self._open_chain(old.hop.start, old.hop.end)
            done = 0
            try:
                if old.inputs:
                    x = torch.cat(old.inputs, dim=1)  # (B, position, H): the whole history
                    for link in links:
                        y = link.stream.step(x, 0, wire_dtype=self.wire_dtype)
                        link.inputs.append(x)
                        x = y
                        done += 1
                break
            except FAILOVER as exc2:
                for link in links:
                    link.stream.close()
                failures += 1
                self._ban(links[done].hop, exc2, failures)
        log.info(
            "blocks %d:%d moved to %s after %s",
            old.hop.start,
            old.hop.end,
            ", ".join(link.hop.endpoint for link in links),
            exc,
        )
        self._links[index : index + 1] = links

    def _ban(self, hop: Hop, exc: Exception, failures: int) -> None:
        self.swarm.router.report_failure(hop, exc, failures=failures, max_retries=self.max_retries)
