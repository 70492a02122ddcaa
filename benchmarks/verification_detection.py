"""Spot-check detection benchmark: corrupting servers caught, honest ones never flagged.

Everything goes through the real check path: in-process `BlockServer`s (gRPC on loopback,
no DHT) on a tiny Llama (4 blocks, hidden 64), a `RemoteModelForCausalLM` client whose
`SpotChecker` audits its forwards, generation steps and backwards, the shipped tolerance
table, a `ReputationBook` with the default policy, and routing that drops quarantined
nodes. Each trial starts with a fresh book and checker (the servers stay up).

(a) f = 1.0: three honest float32 replicas of blocks 0:4 and one server corrupting every
    output, for each fault kind (`noise`, `skip-block`, `other-weights`). Short requests
    (three parallel forwards, then a 4-token generation, over and over) at r = 5% until the
    faulty node is quarantined. Figure: audits of the faulty node until its quarantine,
    per trial; target <= 10 in every trial.
(b) f = 0.01 (`noise`): the same swarm shape; per trial, requests until the faulty node is
    quarantined or has had 600 audits. Figure: the fraction of trials quarantined within
    600 audits; target >= 0.99. Runs at r = 1.0 (see "Accounting").
(c) honest: float32, bfloat16, int8 (float32 and bfloat16 compute) replicas of 0:4, plus
    float32 0:2 and bfloat16 2:4 (so hops are also sub-spans), nobody faulty. Forwards
    (batch 1-8, 4-32 tokens), generations (batch 1-4, 4-8 new tokens) and LoRA training
    steps (batch 1-4; backward with no, per-sample and norms-only adapter gradients, the
    output gradient of the per-row mean cross-entropy through the head) at r = 1.0 until
    10,000 audits. Primaries are drawn at random among the live servers (a benchmark-only
    route cost), so every precision is audited as a primary. Figure: quarantines; target 0.
    Also recorded: verdicts, audits per precision pair, primary/check disagreements, and the
    largest honest disagreement as a fraction of its tolerance, per work kind.

Accounting. An audit "of the faulty node" is an audit event in which its output was one
of the two compared: it was the primary (the event's subject) or the check server (blamed
when the referee sides with the primary). A faulty server decides per output, with its own
RNG, whether to corrupt it, without knowing which outputs will be audited, so each such
audit catches it with probability f whatever r is: the per-audit statistic does not depend
on r. (b) therefore runs at r = 1.0 to spend its time on audits rather than on unaudited
requests; (a) runs at the 5% the target names. Audits as primary only are reported too.
The checker runs inline (the same code as its background worker, in the caller's thread)
so that counts are exact; its draws use a seeded `random.Random` per trial (production
uses `SystemRandom`), the fault RNGs are seeded at server start.

    python benchmarks/verification_detection.py            # full run: several minutes on 2 cores
    python benchmarks/verification_detection.py --quick    # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]  # the shared helpers (benchmarks/_results.py), as training.py imports them

from _results import Run, machine_info, torch_stack  # noqa: E402

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM  # noqa: E402
from corolla.inference.client.routing import Hop, shortest_chain  # noqa: E402
from corolla.inference.models.tiny import TinySpec, init_tiny  # noqa: E402
from corolla.inference.server import BlockServer, ServerConfig  # noqa: E402
from corolla.inference.server.faults import FaultSpec  # noqa: E402
from corolla.inference.wire.backward import AdapterGrads  # noqa: E402
from corolla.verify.events import AuditEvent, QuarantineEvent  # noqa: E402
from corolla.verify.reputation import ReputationBook  # noqa: E402
from corolla.verify.spot_check import SpotChecker, SpotCheckSettings  # noqa: E402

RESULTS = HERE / "results" / "verification_detection.json"
KINDS = ("noise", "skip-block", "other-weights")
# Token ids are drawn from FIRST_ID up: ids 0 and 1 are the tiny tokenizer's BOS/EOS and PAD, and
# PAD's embedding row is zero. A zero row mid-sequence with a loss on it makes RMSNorm's input
# gradient ill-conditioned (~1/sqrt(eps)): honest bfloat16/int8 and float32 input gradients then
# differ by up to ~1e5 there, far beyond the calibrated absolute bound (seen in 2 of 10,011 honest
# audits, both INCONCLUSIVE). Real batches pad at the end with labels -100, so no gradient reaches them.
FIRST_ID = 2
Event = AuditEvent | QuarantineEvent


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    trials_always: int  # (a) trials per fault kind
    trials_rare: int  # (b) trials
    honest_audits: int  # (c) audits to reach
    rare_window: int = 600  # (b) audits of the faulty node per trial
    always_window: int = 10  # (a) target
    rate: float = 0.05  # (a) audit rate
    max_requests: int = 4000  # any trial: requests before giving up (bounds the runtime)
    max_seconds: float = 1500.0  # (c): time before stopping short of honest_audits


FULL = Plan(trials_always=20, trials_rare=200, honest_audits=10_000)
QUICK = Plan(trials_always=2, trials_rare=4, honest_audits=300, max_seconds=30.0)


class Lab:
    """In-process servers of one model, started on demand and stopped together."""

    def __init__(self, model: Path, stack: ExitStack) -> None:
        self.model = model
        self.stack = stack

    def server(self, blocks: tuple[int, int] = (0, 4), **config: Any) -> BlockServer:
        server = BlockServer(ServerConfig(model=self.model, blocks=blocks, dht=False, **config)).start()
        self.stack.callback(server.stop, 0)
        return server

    def client(self, servers: Sequence[BlockServer]) -> RemoteModelForCausalLM:
        model = RemoteModelForCausalLM.from_pretrained(self.model, servers=[s.endpoint for s in servers])
        self.stack.callback(model.close)
        return model


def node_id(server: BlockServer) -> str:
    assert server.servicer is not None
    return server.servicer.stats.node_id


def new_checker(model: RemoteModelForCausalLM, rate: float, seed: int, events: list[Event]) -> SpotChecker:
    book = ReputationBook()
    checker = SpotChecker(
        book,
        sink=events.extend,
        reporter="benchmark",
        settings=SpotCheckSettings(rate=rate, background=False),
        rng=random.Random(seed),
    )
    model.use_spot_checker(checker)  # a fresh book: the faulty node is back in routing
    return checker


def requests(model: RemoteModelForCausalLM, gen: torch.Generator) -> Iterator[None]:
    """Short requests forever: three parallel forwards (batch 2 x 8), then a 4-token generation."""
    for i in itertools.count():
        ids = torch.randint(FIRST_ID, 500, (2, 8), generator=gen)
        with torch.no_grad():
            if i % 4 < 3:
                model.blocks(model.client_parts.embed(ids))
            else:
                model.generate(ids[:1, :4], max_new_tokens=4, eos_token_id=None)
        yield


@dataclass(slots=True)
class Trial:
    audits_until_quarantine: int | None  # audits of the faulty node (primary or check) up to the convicting one
    as_primary: int  # of those, audits with the faulty node as primary
    requests: int
    audits_total: int  # every audit event of the trial
    verdicts: dict[str, int]


def run_trial(model: RemoteModelForCausalLM, bad: str, *, rate: float, seed: int, window: int, plan: Plan) -> Trial:
    events: list[Event] = []
    new_checker(model, rate, seed, events)
    gen = torch.Generator().manual_seed(seed)
    involved = as_primary = seen = 0
    caught: int | None = None
    done = 0
    for done, _ in enumerate(requests(model, gen), start=1):
        for event in events[seen:]:
            if isinstance(event, AuditEvent) and bad in (event.primary.node_id, event.check.node_id):
                involved += 1
                as_primary += event.primary.node_id == bad
            elif isinstance(event, QuarantineEvent) and event.subject.node_id == bad and caught is None:
                caught = involved
        seen = len(events)
        if caught is not None or involved >= window or done >= plan.max_requests:
            break
    verdicts = Counter(e.verdict.value for e in events if isinstance(e, AuditEvent))
    audits = sum(verdicts.values())
    return Trial(caught, as_primary, done, audits, dict(verdicts))


# -- (a) and (b) --------------------------------------------------------------------------------


def always_corrupting(lab: Lab, honest: list[BlockServer], plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {"rate": plan.rate, "fraction": 1.0, "kinds": {}}
    for k, kind in enumerate(KINDS):
        bad = lab.server(inject_fault=FaultSpec.parse(f"{kind}:1.0:{100 + k}"))
        model = lab.client([*honest, bad])
        trials = [
            run_trial(model, node_id(bad), rate=plan.rate, seed=1000 * k + t, window=10**9, plan=plan)
            for t in range(plan.trials_always)
        ]
        counts = [t.audits_until_quarantine for t in trials]
        caught = [c for c in counts if c is not None]
        out["kinds"][kind] = {
            "trials": len(trials),
            "quarantined": len(caught),
            "audits_until_quarantine": counts,
            "max_audits_until_quarantine": max(caught) if len(caught) == len(trials) else None,
            "requests_per_trial_mean": sum(t.requests for t in trials) / len(trials),
            "trials_detail": [asdict(t) for t in trials],
        }
        print(f"(a) {kind}: audits until quarantine {counts}", flush=True)
    return out


def rarely_corrupting(lab: Lab, honest: list[BlockServer], plan: Plan) -> dict[str, Any]:
    bad = lab.server(inject_fault=FaultSpec.parse("noise:0.01:7"))
    model = lab.client([*honest, bad])
    trials = []
    began = time.perf_counter()
    for t in range(plan.trials_rare):
        trials.append(run_trial(model, node_id(bad), rate=1.0, seed=50_000 + t, window=plan.rare_window, plan=plan))
        if (t + 1) % 20 == 0:
            print(f"(b) {t + 1}/{plan.trials_rare} trials, {time.perf_counter() - began:.0f} s", flush=True)
    counts = [t.audits_until_quarantine for t in trials]
    within = sum(c is not None and c <= plan.rare_window for c in counts)
    caught = sorted(c for c in counts if c is not None)
    return {
        "rate": 1.0,
        "fraction": 0.01,
        "kind": "noise",
        "window": plan.rare_window,
        "trials": len(trials),
        "quarantined_within_window": within,
        "fraction_within_window": within / len(trials),
        "expected_fraction_one_fail_suffices": 1 - 0.99**plan.rare_window,
        "median_audits_until_quarantine": caught[len(caught) // 2] if caught else None,
        "audits_until_quarantine": counts,
        "audits_total": sum(t.audits_total for t in trials),
    }


# -- (c) -------------------------------------------------------------------------------------------


SERVERS = ["float32 0:4", "bfloat16 0:4", "int8 (float32) 0:4", "int8 (bfloat16) 0:4", "float32 0:2", "bfloat16 2:4"]


def honest_swarm(lab: Lab, plan: Plan) -> dict[str, Any]:
    servers = [
        lab.server(dtype="float32"),
        lab.server(dtype="bfloat16"),
        lab.server(dtype="float32", quant="int8"),
        lab.server(dtype="bfloat16", quant="int8"),
        lab.server((0, 2), dtype="float32"),
        lab.server((2, 4), dtype="bfloat16"),
    ]
    model = lab.client(servers)
    route_at_random(model, random.Random(13))
    events: list[Event] = []
    checker = new_checker(model, 1.0, 7, events)
    adapter = LoraAdapter.init(model.checkpoint, LoraSettings(r=4, alpha=8.0, targets=("q_proj", "v_proj")), seed=3)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in adapter.named_weights():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    rng = random.Random(5)
    modes = itertools.cycle(AdapterGrads)
    began = time.perf_counter()
    kinds: Counter[str] = Counter()
    step = 0
    while len([e for e in events if isinstance(e, AuditEvent)]) < plan.honest_audits:
        if time.perf_counter() - began > plan.max_seconds:
            break
        step += 1
        kind = ("forward", "generate", "train")[step % 3]
        kinds[kind] += 1
        if kind == "forward":
            ids = torch.randint(FIRST_ID, 500, (rng.choice((1, 2, 3, 4, 8)), rng.randint(4, 32)), generator=gen)
            with torch.no_grad():
                model.blocks(model.client_parts.embed(ids))
        elif kind == "generate":
            ids = torch.randint(FIRST_ID, 500, (rng.choice((1, 2, 4)), rng.randint(4, 12)), generator=gen)
            model.generate(ids, max_new_tokens=rng.randint(4, 8), eos_token_id=None)
        else:
            train_step(model, adapter, next(modes), rng, gen, step)
        if step % 200 == 0:
            audits = len([e for e in events if isinstance(e, AuditEvent)])
            print(f"(c) {audits} honest audits, {time.perf_counter() - began:.0f} s", flush=True)
    audits = [e for e in events if isinstance(e, AuditEvent)]
    worst: dict[str, dict[str, float]] = {}
    for a in audits:
        w = worst.setdefault(a.work.value, {"rel_l2_over_tolerance": 0.0, "max_abs_over_tolerance": 0.0})
        w["rel_l2_over_tolerance"] = max(w["rel_l2_over_tolerance"], a.comparison.rel_l2 / a.tolerance_rel_l2)
        w["max_abs_over_tolerance"] = max(w["max_abs_over_tolerance"], a.comparison.max_abs / a.tolerance_max_abs)
    pairs = Counter("/".join(sorted((a.primary.precision, a.check.precision))) for a in audits)
    disagreeing = [
        {
            "work": a.work.value,
            "primary": a.primary.precision,
            "check": a.check.precision,
            "referee": None if a.referee is None else a.referee.precision,
            "span": f"{a.subject.start}:{a.subject.end}",
            "comparison": a.comparison.model_dump(),
            "tolerance": [a.tolerance_rel_l2, a.tolerance_max_abs],
            "referee_vs_primary": None if a.referee_vs_primary is None else a.referee_vs_primary.model_dump(),
            "referee_vs_check": None if a.referee_vs_check is None else a.referee_vs_check.model_dump(),
            "verdict": a.verdict.value,
        }
        for a in audits
        if not a.comparison.agree
    ]
    return {
        "rate": 1.0,
        "servers": SERVERS,
        "requests": dict(kinds),
        "audits": len(audits),
        "audits_by_work": dict(Counter(a.work.value for a in audits)),
        "audits_by_precision_pair": dict(pairs),
        "audits_by_primary_precision": dict(Counter(a.primary.precision for a in audits)),
        "verdicts": dict(Counter(a.verdict.value for a in audits)),
        "disagreements": len(disagreeing),
        "disagreements_detail": disagreeing[:50],
        "blamed": sum(a.blamed is not None for a in audits),
        "quarantines": sum(isinstance(e, QuarantineEvent) for e in events),
        "worst_disagreement_vs_tolerance": worst,
        "checker": asdict(checker.stats()),
        "seconds": round(time.perf_counter() - began, 1),
    }


def route_at_random(model: RemoteModelForCausalLM, rng: random.Random) -> None:
    """Benchmark only: any live server may be a primary, so that every precision's work is
    audited (routing proper sends nearly all of it to the fastest server). The check path,
    which picks check and referee servers from the same router's records, is unchanged."""
    router = model.swarm.router

    def route(start: int, end: int) -> list[Hop]:
        return shortest_chain(router.records(), start, end, lambda r, a, b: rng.uniform(0.5, 1.5))

    router.forward_route = route  # type: ignore[method-assign]
    router.generation_route = route  # type: ignore[method-assign]


def train_step(
    model: RemoteModelForCausalLM,
    adapter: LoraAdapter,
    mode: AdapterGrads,
    rng: random.Random,
    gen: torch.Generator,
    step: int,
) -> None:
    """One LoRA step's remote work: forward, then backward with `mode` adapter gradients."""
    ids = torch.randint(FIRST_ID, 500, (rng.choice((1, 2, 4)), rng.randint(8, 24)), generator=gen)
    model.use_adapter(adapter)
    try:
        blocks = model.blocks
        hidden = model.client_parts.embed(ids).detach()
        out, trace = blocks.forward_with_trace(hidden, 0, blocks.num_blocks)
        with torch.enable_grad():
            y = out.detach().requires_grad_(True)
            logits = model.client_parts.head(y).float()
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            (grad,) = torch.autograd.grad(ce.view(ids.shape[0], -1).mean(dim=1).sum(), y)
        step_id = f"bench-{step}" if mode == AdapterGrads.NORMS else ""
        _, parts = blocks.backward_through(trace, grad, adapter_grads=mode, step_id=step_id)
        if mode == AdapterGrads.NORMS:  # the client's ClipSum, as DP training asks for it
            blocks.clip_sums(parts, torch.ones(ids.shape[0]))
        with torch.no_grad():  # an optimizer step: the next audits must use the new weights
            for _, p in adapter.named_weights():
                p.mul_(0.999)
    finally:
        model.use_adapter(None)


# -- report ----------------------------------------------------------------------------------------


def targets(result: dict[str, Any], plan: Plan, quick: bool) -> dict[str, Any]:
    note = "quick run: too few trials/audits to be a measurement" if quick else None
    out: dict[str, Any] = {}
    for kind, k in result["always"]["kinds"].items():
        worst = k["max_audits_until_quarantine"]
        out[f"f1_{kind}_audits_until_quarantine"] = {
            "value": worst,
            "limit": plan.always_window,
            "pass": worst is not None and worst <= plan.always_window,
            "note": note or f"largest over {k['trials']} trials at r = {plan.rate}",
        }
    rare = result["rare"]
    out["f001_fraction_quarantined_within_600_audits"] = {
        "value": rare["fraction_within_window"],
        "limit": 0.99,
        "pass": rare["fraction_within_window"] >= 0.99,
        "note": note or f"{rare['trials']} trials",
    }
    honest = result["honest"]
    enough = honest["audits"] >= 10_000
    out["honest_audits"] = {"value": honest["audits"], "limit": 10_000, "pass": enough, "note": note}
    out["honest_quarantines"] = {"value": honest["quarantines"], "limit": 0, "pass": honest["quarantines"] == 0}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run (under a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--parts", default="abc", help="which parts to run (default abc)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(1)  # servers and client share this process and 2 cores
    run = Run("verification_detection", quick=args.quick, machine=machine_info(**torch_stack()))
    result = run.result
    result["plan"] = asdict(plan)
    with tempfile.TemporaryDirectory(prefix="corolla-bench-") as tmp, ExitStack() as stack:
        lab = Lab(init_tiny(Path(tmp) / "tiny-llama", TinySpec(arch="llama")), stack)
        if "a" in args.parts or "b" in args.parts:
            honest = [lab.server() for _ in range(3)]
            if "a" in args.parts:
                result["always"] = always_corrupting(lab, honest, plan)
            if "b" in args.parts:
                result["rare"] = rarely_corrupting(lab, honest, plan)
                print(f"(b) fraction within 600 audits: {result['rare']['fraction_within_window']:.3f}", flush=True)
        if "c" in args.parts:
            result["honest"] = honest_swarm(lab, plan)
            h = result["honest"]
            print(f"(c) {h['audits']} honest audits, {h['quarantines']} quarantines, verdicts {h['verdicts']}")
    if set("abc") <= set(args.parts):
        result["targets"] = targets(result, plan, args.quick)
    run.finish(args.out, record_output=False)  # its records have never had an "output" key
    for name, t in result.get("targets", {}).items():
        print(f"{'PASS' if t['pass'] else 'FAIL'} {name}: {t['value']} (limit {t['limit']})")
    run.print_written()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
