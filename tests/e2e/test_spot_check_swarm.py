"""A fault-injecting replica among real `platform serve` processes is caught and routed around.

Three replicas of blocks 0:4 found through the DHT; one runs `--inject-fault noise:1.0`
(every output corrupted). A client generates with a spot checker auditing every step (in
its background worker, as in production). The bad replica is quarantined (as a primary
FAILed by the referee, or as a check server blamed by it), leaves the client's routing, and
a generation after that equals local `generate()` token for token.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.inference.client import RemoteModelForCausalLM
from corolla.platform.launch.servers import LocalServers
from corolla.verify import SpotChecker, SpotCheckSettings
from corolla.verify.events import AuditEvent, QuarantineEvent, Verdict
from corolla.verify.reputation import ReputationBook

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # 35 s idle, 90 s under load: three server processes

NEW_TOKENS = 12


def test_fault_injecting_replica_is_quarantined_and_output_is_clean(tiny_llama: Path) -> None:
    local = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = torch.randint(0, 500, (1, 6), generator=torch.Generator().manual_seed(11))
    want = local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=None)

    book = ReputationBook()
    events: list[AuditEvent | QuarantineEvent] = []
    checker = SpotChecker(book, sink=events.extend, reporter="site-0", settings=SpotCheckSettings(rate=1.0))
    with (
        LocalServers(tiny_llama, [(0, 4)] * 3, torch_threads=1, faults={1: "noise:1.0"}) as swarm,
        RemoteModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers) as model,
    ):
        model.use_spot_checker(checker)
        router = model.swarm.router
        deadline = time.monotonic() + 30
        while len(router.records(refresh=True)) < 3:  # every record announced and found
            assert time.monotonic() < deadline, "the three servers never all showed in the DHT"
            time.sleep(0.5)
        bad = next(r for r in router.records() if r.endpoint == swarm.endpoints[1])

        for _ in range(5):  # each generation audits every step; one should be enough
            model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None)
            assert checker.flush(timeout=60)
            if bad.node_id in book.quarantined_nodes(model.swarm.model_id):
                break
        assert bad.node_id in book.quarantined_nodes(model.swarm.model_id)
        assert bad.endpoint not in {r.endpoint for r in router.records()}
        assert bad.endpoint not in {r.endpoint for r in router.records(refresh=True)}

        session = model.inference_session(max_length=6 + NEW_TOKENS)
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None, session=session)
        assert all(hop.endpoint != bad.endpoint for hop in session.route)
        session.close()
        assert checker.flush(timeout=60)
    checker.close()

    assert torch.equal(got, want)
    quarantines = [e for e in events if isinstance(e, QuarantineEvent)]
    assert [q.subject.node_id for q in quarantines] == [bad.node_id]
    audits = [e for e in events if isinstance(e, AuditEvent)]
    convicting = [a for a in audits if a.event_id in quarantines[0].evidence]
    assert convicting and all(
        (a.verdict == Verdict.FAIL and a.subject.node_id == bad.node_id)
        or (a.blamed is not None and a.blamed.node_id == bad.node_id)
        for a in convicting
    )
    honest = {r for r in {a.subject.node_id for a in audits} if r != bad.node_id}
    assert honest and not any(book.is_quarantined(a.subject) for a in audits if a.subject.node_id in honest)
    assert checker.stats().errors == 0
