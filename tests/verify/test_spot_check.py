"""Spot checks over real in-process servers: verdicts, referees, quarantine, routing, every work kind."""

from __future__ import annotations

import hashlib
import math
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM
from corolla.inference.client.adapter_sync import AdapterSync
from corolla.inference.client.routing import Hop
from corolla.inference.client.sequential import RemoteSequential
from corolla.inference.client.session import InferenceSession
from corolla.inference.client.swarm import Swarm
from corolla.inference.discovery import ServerRecord
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.server import BlockServer
from corolla.inference.server.faults import FaultSpec
from corolla.inference.wire.backward import AdapterGrads
from corolla.verify import SpotChecker, SpotCheckSettings
from corolla.verify.errors import VerifyError
from corolla.verify.events import AuditEvent, QuarantineEvent, Subject, Verdict, Work, canonical_json, parse_event
from corolla.verify.reputation import ReputationBook
from corolla.verify.spot_check import tensor_digest
from corolla.verify.spot_check.work import compare_parts
from corolla.verify.tolerance import Tolerance

NOISE = "noise:1.0:1"


class _Ordered(random.Random):
    """Offers candidates in the order `first` names endpoints (the rest after), or shuffled
    (seeded) when `first` is empty. (Overriding `random()` would also change `shuffle`.)"""

    def __init__(self, first: Sequence[str] = ()) -> None:
        super().__init__(0)
        self.first = list(first)

    def shuffle(self, x: list[Any]) -> None:  # type: ignore[override]
        if not self.first:
            super().shuffle(x)
            return
        rank = {e: i for i, e in enumerate(self.first)}
        x.sort(key=lambda r: rank.get(r.endpoint, len(rank)))


@dataclass
class Lab:
    swarm: Swarm
    servers: list[BlockServer]
    book: ReputationBook = field(default_factory=ReputationBook)
    events: list[AuditEvent | QuarantineEvent] = field(default_factory=list)
    client: Any = None  # the model's embeddings and head
    records: dict[str, ServerRecord] = field(default_factory=dict)  # endpoint -> record, before any quarantine

    def __post_init__(self) -> None:
        self.records = {r.endpoint: r for r in self.swarm.router.records(refresh=True)}

    def checker(self, *, first: Sequence[BlockServer] = (), **settings: Any) -> SpotChecker:
        settings.setdefault("rate", 1.0)
        settings.setdefault("background", False)
        checker = SpotChecker(
            self.book,
            sink=self.events.extend,
            reporter="site-0",
            settings=SpotCheckSettings(**settings),
            rng=_Ordered([s.endpoint for s in first]),
        )
        checker.attach(self.swarm.router)
        return checker

    def hidden(self, batch: int = 2, tokens: int = 6, seed: int = 0) -> torch.Tensor:
        """Embeddings of random token ids: the inputs (and scale) tolerances were calibrated on."""
        ids = torch.randint(2, 500, (batch, tokens), generator=torch.Generator().manual_seed(seed))  # no PAD (zero row)
        return self.client.embed(ids).detach()

    def record(self, server: BlockServer) -> ServerRecord:
        return self.records[server.endpoint]

    def subject(self, server: BlockServer) -> Subject:
        r = self.record(server)
        return Subject(node_id=r.node_id, model_id=self.swarm.model_id, start=r.start, end=r.end)

    def audits(self) -> list[AuditEvent]:
        return [e for e in self.events if isinstance(e, AuditEvent)]


@pytest.fixture
def make_lab(tiny_llama: Path, start_server: Callable[..., BlockServer]) -> Iterator[Callable[..., Lab]]:
    swarms: list[Swarm] = []

    def make(*configs: dict[str, Any], span: tuple[int, int] = (0, 4)) -> Lab:
        servers = [start_server(tiny_llama, span, **config) for config in configs]
        checkpoint = Checkpoint.open(tiny_llama)
        swarm = Swarm(model_id=checkpoint.model_id, servers=[s.endpoint for s in servers])
        swarms.append(swarm)
        return Lab(swarm, servers, client=checkpoint.load_client())

    yield make
    for swarm in swarms:
        swarm.close()


def _pinned_forward(lab: Lab, checker: SpotChecker, server: BlockServer, x: torch.Tensor) -> None:
    """The hook as `RemoteSequential` calls it, with `server` as the primary."""
    hop = Hop(lab.record(server), 0, 4)
    out = lab.swarm.stub(server.endpoint).forward(x, model_id=lab.swarm.model_id, start=0, end=4)
    checker.forward_done(lab.swarm, hop, x, out)


# -- verdicts ------------------------------------------------------------------------------------


def test_honest_servers_pass_and_hashes_name_the_work(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab({}, {"dtype": "bfloat16"}, {})
    blocks = RemoteSequential(lab.swarm, num_blocks=4)
    blocks.spot_checker = lab.checker()
    x = lab.hidden()
    out = blocks(x)
    (event,) = lab.audits()
    assert event.verdict == Verdict.PASS and event.work == Work.FORWARD
    assert event.referee is None and event.blamed is None and event.comparison.agree
    assert event.check.node_id != event.primary.node_id
    assert event.input_sha256 == tensor_digest([("hidden", x)])
    assert event.primary.output_sha256 == tensor_digest([("output", out)])
    precisions = {lab.record(s).node_id: "bfloat16" if i == 1 else "float32" for i, s in enumerate(lab.servers)}
    assert event.check.precision == precisions[event.check.node_id]
    assert event.tolerance_rel_l2 > 0 and event.subject.node_id == event.primary.node_id
    assert parse_event(canonical_json(event)) == event  # what the ledger stores
    stats = blocks.spot_checker.stats()
    assert (stats.sampled, stats.audits, stats.passed, stats.failed) == (1, 1, 1, 0)


def test_corrupting_primary_fails_is_quarantined_and_leaves_routing(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab({"inject_fault": FaultSpec.parse(NOISE)}, {}, {})
    bad = lab.servers[0]
    checker = lab.checker()
    assert bad.endpoint in {r.endpoint for r in lab.swarm.router.records()}
    _pinned_forward(lab, checker, bad, lab.hidden())
    audit, quarantine = lab.events
    assert isinstance(audit, AuditEvent) and isinstance(quarantine, QuarantineEvent)
    assert audit.verdict == Verdict.FAIL and audit.subject == lab.subject(bad)
    assert audit.referee is not None and audit.referee_vs_check is not None and audit.referee_vs_check.agree
    assert audit.referee_vs_primary is not None and not audit.referee_vs_primary.agree
    assert len({audit.primary.node_id, audit.check.node_id, audit.referee.node_id}) == 3
    assert quarantine.subject == audit.subject and quarantine.evidence == [audit.event_id]
    assert lab.book.is_quarantined(audit.subject)
    # the router leaves it out at once (the quarantine invalidated its records) and at every refresh
    assert bad.endpoint not in {r.endpoint for r in lab.swarm.router.records()}
    assert bad.endpoint not in {r.endpoint for r in lab.swarm.router.records(refresh=True)}
    routed = {lab.swarm.router.forward_route(0, 4)[0].endpoint for _ in range(20)}
    assert routed <= {s.endpoint for s in lab.servers[1:]}
    assert checker.stats().quarantines == 1


def test_requests_through_the_client_get_the_bad_replica_quarantined(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab({}, {"inject_fault": FaultSpec.parse(NOISE)}, {})
    blocks = RemoteSequential(lab.swarm, num_blocks=4)
    blocks.spot_checker = checker = lab.checker()
    bad = lab.subject(lab.servers[1])
    for i in range(30):  # each forward is audited; the bad replica is primary or check about 2/3 of the time
        blocks(lab.hidden(seed=i))
        if lab.book.is_quarantined(bad):
            break
    seen = [(a.verdict.value, a.primary.node_id, a.check.node_id) for a in lab.audits()]
    assert lab.book.is_quarantined(bad), (bad.node_id, checker.stats(), seen[:5])
    assert not any(lab.book.is_quarantined(lab.subject(s)) for s in (lab.servers[0], lab.servers[2]))
    assert all(r.node_id != bad.node_id for r in lab.swarm.router.records())


def test_corrupting_check_server_is_blamed(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab({}, {"inject_fault": FaultSpec.parse(NOISE)}, {})
    honest, bad = lab.servers[0], lab.servers[1]
    checker = lab.checker(first=[bad])
    _pinned_forward(lab, checker, honest, lab.hidden())
    audit = lab.audits()[0]
    assert audit.verdict == Verdict.PASS and not audit.comparison.agree
    assert audit.check.node_id == lab.subject(bad).node_id
    assert audit.blamed == lab.subject(bad)
    assert lab.book.is_quarantined(lab.subject(bad)) and not lab.book.is_quarantined(audit.subject)
    assert checker.stats().blamed == 1


def test_without_a_referee_nothing_moves(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab({}, {"inject_fault": FaultSpec.parse(NOISE)})
    honest, bad = lab.servers
    checker = lab.checker()
    _pinned_forward(lab, checker, honest, lab.hidden())
    (audit,) = lab.events
    assert isinstance(audit, AuditEvent)
    assert audit.verdict == Verdict.INCONCLUSIVE and audit.referee is None and audit.blamed is None
    for server in (honest, bad):
        state = lab.book.state(lab.subject(server))
        assert (state.passes, state.fails, state.quarantined) == (0.0, 0.0, False)
    assert checker.stats().inconclusive == 1


def test_no_other_server_leaves_the_work_unchecked(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab({})
    blocks = RemoteSequential(lab.swarm, num_blocks=4)
    blocks.spot_checker = lab.checker()
    blocks(lab.hidden())
    assert lab.events == []
    stats = blocks.spot_checker.stats()
    assert (stats.sampled, stats.unchecked, stats.audits) == (1, 1, 0)
    assert lab.book.subjects() == []  # unaudited work earns nothing


def test_a_node_never_checks_itself(make_lab: Callable[..., Lab]) -> None:
    """Two endpoints of one node are one server: the other is not a check for it."""
    lab = make_lab({}, {})
    record = lab.record(lab.servers[0])
    twin = record.model_copy(update={"endpoint": lab.servers[1].endpoint})
    lab.swarm.router._source = lambda: [record, twin]  # the same node id twice
    checker = lab.checker()
    _pinned_forward(lab, checker, lab.servers[0], lab.hidden())
    assert lab.events == [] and checker.stats().unchecked == 1


# -- inference steps ----------------------------------------------------------------------------


def test_generation_steps_are_audited_by_a_parallel_forward(make_lab: Callable[..., Lab], tiny_llama: Path) -> None:
    lab = make_lab({}, {}, {"dtype": "bfloat16"})
    checker = lab.checker()
    with RemoteModelForCausalLM.from_pretrained(tiny_llama, servers=lab.swarm._static, spot_checker=checker) as model:
        ids = torch.randint(0, 500, (2, 5), generator=torch.Generator().manual_seed(3))
        model.generate(ids, max_new_tokens=6, eos_token_id=None)
    audits = lab.audits()
    assert len(audits) == 6 and all(a.work == Work.INFERENCE for a in audits)
    assert all(a.verdict == Verdict.PASS for a in audits), [a.comparison for a in audits]
    assert len({a.input_sha256 for a in audits}) == 6


def _session_on_the_bad_server(make_lab: Callable[..., Lab]) -> tuple[Lab, BlockServer, InferenceSession]:
    """A lab whose first server adds noise to every output, and an audited inference session
    opened on that server (the router then goes back to excluding quarantined nodes only)."""
    lab = make_lab({"inject_fault": FaultSpec.parse(NOISE)}, {}, {})
    bad = lab.servers[0]
    checker = lab.checker()
    router = lab.swarm.router
    router.exclude = lambda r: r.endpoint != bad.endpoint
    router.invalidate()
    session = InferenceSession(lab.swarm, start=0, end=4, max_length=16, batch_size=1, spot_checker=checker)
    checker.attach(router)
    assert [h.endpoint for h in session.route] == [bad.endpoint]
    return lab, bad, session


def test_a_corrupted_step_fails_and_the_node_leaves(make_lab: Callable[..., Lab]) -> None:
    lab, bad, session = _session_on_the_bad_server(make_lab)
    x = lab.hidden(batch=1, tokens=8)
    session.step(x[:, :5])
    session.close()
    audit = lab.audits()[0]
    assert audit.work == Work.INFERENCE and audit.verdict == Verdict.FAIL
    assert lab.book.is_quarantined(lab.subject(bad))
    with InferenceSession(lab.swarm, start=0, end=4, max_length=16) as fresh:
        assert fresh.route[0].endpoint != bad.endpoint


def test_an_open_session_moves_off_a_node_once_it_is_quarantined(make_lab: Callable[..., Lab]) -> None:
    lab, bad, session = _session_on_the_bad_server(make_lab)
    x = lab.hidden(batch=1, tokens=8)
    session.step(x[:, :5])  # audited at rate 1: FAIL, quarantined
    assert lab.book.is_quarantined(lab.subject(bad))
    out = session.step(x[:, 5:6])  # the next step replays the history on an honest replica
    assert session.route[0].endpoint != bad.endpoint
    honest = lab.swarm.stub(session.route[0].endpoint).forward(x[:, :6], model_id=lab.swarm.model_id, start=0, end=4)
    torch.testing.assert_close(out, honest[:, 5:6], rtol=0, atol=1e-5)  # same as an honest forward of the prefix
    session.close()
    assert lab.audits()[-1].verdict == Verdict.PASS  # the step on the honest replica


def test_later_steps_compare_only_their_positions(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab({}, {}, {})
    checker = lab.checker()
    x = lab.hidden(batch=2, tokens=9)
    with InferenceSession(lab.swarm, start=0, end=4, max_length=9, batch_size=2, spot_checker=checker) as session:
        outs = [session.step(x[:, :4]), session.step(x[:, 4:5]), session.step(x[:, 5:9])]
    audits = lab.audits()
    assert [a.verdict for a in audits] == [Verdict.PASS] * 3
    positions = [torch.arange(0, 4), torch.arange(4, 5), torch.arange(5, 9)]
    for audit, out, pos in zip(audits, outs, positions, strict=True):
        assert audit.primary.output_sha256 == tensor_digest([("output", out)])
        assert audit.input_sha256 == tensor_digest([("hidden", x[:, : int(pos[-1]) + 1]), ("positions", pos)])


# -- backward ------------------------------------------------------------------------------------


def _adapter(checkpoint: Checkpoint) -> LoraAdapter:
    adapter = LoraAdapter.init(checkpoint, LoraSettings(r=4, alpha=8.0, targets=("q_proj", "v_proj")), seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in adapter.named_weights():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return adapter


@pytest.mark.parametrize("mode", list(AdapterGrads))
def test_backward_audits_compare_input_and_adapter_gradients(
    mode: AdapterGrads, make_lab: Callable[..., Lab], tiny_llama: Path
) -> None:
    lab = make_lab({}, {}, {})
    blocks = RemoteSequential(lab.swarm, num_blocks=4)
    blocks.adapter = AdapterSync(_adapter(Checkpoint.open(tiny_llama)), model_id=lab.swarm.model_id)
    blocks.spot_checker = lab.checker()
    x = lab.hidden(batch=3)
    out, trace = blocks.forward_with_trace(x, 0, 4)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)) * 1e-2
    step_id = "step-1" if mode == AdapterGrads.NORMS else ""
    _, parts = blocks.backward_through(trace, grad, adapter_grads=mode, step_id=step_id)
    audits = lab.audits()
    assert [a.work for a in audits] == [Work.FORWARD, Work.BACKWARD]
    assert all(a.verdict == Verdict.PASS for a in audits), [a.comparison for a in audits]
    backward = audits[1]
    assert backward.input_sha256 == tensor_digest([("hidden", x), ("grad_output", grad)])
    primary = parts[0].hop.endpoint
    for server in lab.servers:  # a NORMS check leaves no per-sample gradients behind
        assert server.servicer is not None
        assert len(server.servicer.grads) == (1 if mode == AdapterGrads.NORMS and server.endpoint == primary else 0)


@pytest.mark.parametrize("mode", [AdapterGrads.PER_SAMPLE, AdapterGrads.NORMS])
def test_corrupted_adapter_gradients_fail(mode: AdapterGrads, make_lab: Callable[..., Lab], tiny_llama: Path) -> None:
    lab = make_lab({}, {"inject_fault": FaultSpec.parse(NOISE)}, {})
    bad = lab.servers[1]
    sync = AdapterSync(_adapter(Checkpoint.open(tiny_llama)), model_id=lab.swarm.model_id)
    checker = lab.checker()
    x, g = lab.hidden(batch=2), torch.randn(2, 6, 64) * 1e-2
    stub = lab.swarm.stub(bad.endpoint)
    step_id = "s" if mode == AdapterGrads.NORMS else ""
    call = lambda d: stub.backward(  # noqa: E731
        x, g, model_id=lab.swarm.model_id, start=0, end=4, adapter=d, adapter_grads=mode, step_id=step_id
    )
    result = sync.call(stub, 0, 4, call)
    checker.backward_done(
        lab.swarm, Hop(lab.record(bad), 0, 4), x, g, result, mode=mode, grad_input=True, adapter=sync,
        adapter_digest=sync.digest(0, 4),
    )  # fmt: skip
    assert lab.audits()[0].verdict == Verdict.FAIL
    assert lab.book.is_quarantined(lab.subject(bad))


def test_adapter_weights_that_moved_on_leave_the_work_unchecked(make_lab: Callable[..., Lab], tiny_llama: Path) -> None:
    lab = make_lab({}, {}, {})
    adapter = _adapter(Checkpoint.open(tiny_llama))
    sync = AdapterSync(adapter, model_id=lab.swarm.model_id)
    checker = lab.checker()
    digest = sync.digest(0, 4)
    with torch.no_grad():
        next(iter(adapter.params.values())).add_(1.0)  # an optimizer step after the call
    x = lab.hidden()
    checker.forward_done(lab.swarm, Hop(lab.record(lab.servers[0]), 0, 4), x, x, adapter=sync, adapter_digest=digest)
    assert lab.events == [] and checker.stats().unchecked == 1


# -- the worker ----------------------------------------------------------------------------------


def test_a_full_queue_drops_audits_and_never_blocks(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab({}, {}, {})
    release = threading.Event()
    sunk: list[object] = []

    def slow_sink(events: list[Any]) -> None:
        release.wait(30)
        sunk.extend(events)

    checker = SpotChecker(
        lab.book,
        sink=slow_sink,
        reporter="site-0",
        settings=SpotCheckSettings(rate=1.0, queue_size=1),
        rng=_Ordered(),
    )
    blocks = RemoteSequential(lab.swarm, num_blocks=4)
    blocks.spot_checker = checker
    for i in range(6):
        blocks(lab.hidden(seed=i))  # returns at once: the worker is stuck in the sink
    stats = checker.stats()
    assert stats.sampled == 6 and stats.dropped >= 4
    release.set()
    assert checker.flush(timeout=60)
    checker.close()
    stats = checker.stats()
    assert stats.audits == 6 - stats.dropped == len(sunk)


def test_settings_are_validated() -> None:
    for rate in (0, -0.1, 1.5, math.nan, math.inf, True, "0.1"):
        with pytest.raises(VerifyError, match="rate="):
            SpotCheckSettings(rate=rate)  # type: ignore[arg-type]
    with pytest.raises(VerifyError, match="queue_size="):
        SpotCheckSettings(queue_size=0)
    assert SpotCheckSettings().rate == 0.05
    with pytest.raises(VerifyError, match="reporter"):
        SpotChecker(ReputationBook(), sink=print, reporter="")


def test_tensor_digest_encoding() -> None:
    """Known answer: name, dtype, shape, NUL-separated, then the raw little-endian bytes."""
    t = torch.tensor([[1.0, -2.0]], dtype=torch.float32)
    p = torch.tensor([3], dtype=torch.int64)
    want = hashlib.sha256(
        b"hidden\x00float32\x001,2\x00"
        + bytes.fromhex("0000803f000000c0")
        + b"positions\x00int64\x001\x00"
        + bytes.fromhex("0300000000000000")
    ).hexdigest()
    assert tensor_digest([("hidden", t), ("positions", p)]) == want
    assert tensor_digest([("hidden", t.to(torch.bfloat16))]) != tensor_digest([("hidden", t)])


def test_parts_compare_as_a_whole() -> None:
    """Adapter parts are held to the relative bound only; the figures agree with the verdict."""
    tol = Tolerance(rel_l2=0.01, max_abs=0.01)
    g = torch.ones(2, 3, 4)
    big = torch.full((2, 5), 1000.0)  # adapter gradients: large, 0.5% off, 5 apart
    same = compare_parts(
        [("grad_input", g), ("adapter_grad_norms", big)], [("grad_input", g), ("adapter_grad_norms", big * 1.005)], tol
    )
    assert same.agree and same.max_abs == 0.0 and same.rel_l2 == pytest.approx(0.005 / 1.005)
    off = compare_parts([("grad_input", g * 1.02)], [("grad_input", g)], tol)
    assert not off.agree and off.rel_l2 == pytest.approx(0.02)
    renamed = compare_parts([("output", g)], [("grad_input", g)], tol)
    assert not renamed.agree
    reshaped = compare_parts([("output", g)], [("output", g.reshape(3, 2, 4))], tol)
    assert not reshaped.agree
