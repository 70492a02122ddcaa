"""Spot checks on the real SmolLM2-135M-Instruct (slow): honest float32 and int8 servers pass,
judged against the shipped table's SmolLM2 entry; a corrupting server fails and leaves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.client.routing import Hop
from corolla.inference.client.swarm import Swarm
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.server import BlockServer
from corolla.inference.server.faults import FaultSpec
from corolla.verify import SpotChecker, SpotCheckSettings
from corolla.verify.events import AuditEvent, QuarantineEvent, Verdict
from corolla.verify.reputation import ReputationBook
from corolla.verify.tolerance import Match, tolerance_for

pytestmark = pytest.mark.slow
SPAN = (15, 30)  # the span whose honest int8 server the shipped tiny-model table quarantined


def _checker(book: ReputationBook, events: list[AuditEvent | QuarantineEvent], swarm: Swarm) -> SpotChecker:
    checker = SpotChecker(
        book, sink=events.extend, reporter="site-0", settings=SpotCheckSettings(rate=1.0, background=False)
    )
    checker.attach(swarm.router)
    return checker


def test_honest_float32_and_int8_servers_of_the_real_model_pass(
    smollm2: Path, start_server: Callable[..., BlockServer]
) -> None:
    pytest.importorskip("bitsandbytes")
    servers = [start_server(smollm2, (0, 30), **c) for c in ({}, {"quant": "int8"}, {})]
    checkpoint = Checkpoint.open(smollm2)
    assert tolerance_for("int8", "float32", "forward", model_id=checkpoint.model_id).match == Match.MODEL
    book, events = ReputationBook(), []
    swarm = Swarm(model_id=checkpoint.model_id, servers=[s.endpoint for s in servers])
    try:
        checker = _checker(book, events, swarm)
        with RemoteModelForCausalLM.from_pretrained(
            smollm2, servers=[s.endpoint for s in servers], spot_checker=checker
        ) as model:
            ids = torch.randint(2, 49152, (2, 7), generator=torch.Generator().manual_seed(5))
            model.generate(ids, max_new_tokens=4, eos_token_id=None)  # decode steps (and the prefill)
            model(ids)  # a parallel forward
    finally:
        swarm.close()
    audits = [e for e in events if isinstance(e, AuditEvent)]
    assert len(audits) >= 5
    assert all(a.verdict != Verdict.FAIL for a in audits), [(a.comparison, a.tolerance_rel_l2) for a in audits]
    assert not book.quarantined() and not any(isinstance(e, QuarantineEvent) for e in events)


def test_a_corrupting_server_of_the_real_model_fails_and_is_quarantined(
    smollm2: Path, start_server: Callable[..., BlockServer]
) -> None:
    servers = [start_server(smollm2, SPAN, **c) for c in ({"inject_fault": FaultSpec.parse("noise:1.0:3")}, {}, {})]
    bad = servers[0]
    checkpoint = Checkpoint.open(smollm2)
    book, events = ReputationBook(), []
    swarm = Swarm(model_id=checkpoint.model_id, servers=[s.endpoint for s in servers])
    try:
        checker = _checker(book, events, swarm)
        record = next(r for r in swarm.router.records(refresh=True) if r.endpoint == bad.endpoint)
        ids = torch.randint(2, 49152, (1, 9), generator=torch.Generator().manual_seed(6))
        x = checkpoint.load_client().embed(ids).detach()
        out = swarm.stub(bad.endpoint).forward(x, model_id=checkpoint.model_id, start=SPAN[0], end=SPAN[1])
        checker.forward_done(swarm, Hop(record, *SPAN), x, out)
    finally:
        swarm.close()
    audit, quarantine = events
    assert isinstance(audit, AuditEvent) and isinstance(quarantine, QuarantineEvent)
    assert audit.verdict == Verdict.FAIL and audit.subject.node_id == record.node_id
    assert "gross" in quarantine.reason  # 25% noise is far beyond the float32 tolerance
