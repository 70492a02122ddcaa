"""Spot-check verification on the real SmolLM2-135M-Instruct: honest servers kept, corrupt ones caught.

Two parts, in one run, against the shipped tolerance table (its SmolLM2 entry, found by the
model's weight fingerprint):

1. In process, real recomputes, simulated policy. Four honest "nodes" per span of the real
   model (blocks 0:15 and 15:30, as a two-hop swarm splits it): float32 computing a batch
   at once, float32 computing row by row (another batch split), bfloat16, and int8 weights
   (float32 compute), all `SpanBackend`s as `platform serve` builds them. Per request
   (random token ids; batch 2, 8 to 24 tokens; the 15:30 input is the float32 output of
   0:15, as in a chain): each node's parallel forward, its cached one-token steps (prefill,
   then 3 steps) and its backward (input gradient of the per-row mean next-token
   cross-entropy through the head, as a training client sends). Every (primary, check,
   referee) triple of distinct nodes is judged exactly as `SpotChecker` judges (`compare`
   with `tolerance_for(..., model_id=, hidden_size=)`, then `judge`): forward against the
   check's forward, the primary's cached steps against the check's parallel recompute of the
   same positions, backward against backward. Corrupt primaries (float32 and int8) answer
   with the fault server's corruptions (`corolla/inference/server/faults.py`): `noise` (25%
   of each row's RMS), `skip-block` (the span's last block left out), `other-weights` (here:
   the span's blocks in rotated order, another checkpoint's weights of the same shapes).
   Then the reputation policy (`ReputationBook`, default policy) is run over audits drawn
   from these real verdicts:
   (c) honest: 10,000 audits drawn uniformly from the honest (primary, check, referee)
       verdicts, subjects = node x span, one book; figure: quarantines (target 0). Also the
       distinct real comparisons behind them, their verdicts, and the largest honest
       disagreement as a fraction of its tolerance, per work and pair.
   (a) f = 1.0: per fault kind and corrupt precision, trials of a fresh book fed corrupt
       audits (drawn from that kind's real verdicts) until quarantine; figure: audits until
       quarantine, worst trial (target <= 10).
   (b) f = 0.01: per kind and precision, trials of up to 600 audits, each corrupt with
       probability 0.01 (then a corrupt verdict, else an honest one of the same primary
       precision); figure: fraction of trials quarantined within 600 (target >= 0.99).
   What this simulates: the draw of which outputs are corrupted and audited, and the
   order of verdicts; not new tensors per audit. The distinct real verdicts are reported so
   that the figures can be read for what they are (0 honest FAILs among N distinct verdicts
   means no number of draws quarantines anyone).
2. Real `platform serve` processes: float32, int8 and float32 servers of the whole model
   (3 processes, blocks 0:30), and `platform generate --audit-rate 1.0` on medical prompts,
   each on a fresh ledger; figure: audit events and quarantines in the ledgers (target 0).

    python benchmarks/verification_real.py            # full run (~10-15 min on 2 shared cores)
    python benchmarks/verification_real.py --quick    # smoke run

Run it under the machine-wide lock: `flock /tmp/corolla-heavy.lock python benchmarks/verification_real.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from _results import Run, machine_info  # noqa: E402

from corolla.inference.models.checkpoint import Checkpoint  # noqa: E402
from corolla.inference.models.importer import cached_import  # noqa: E402
from corolla.inference.server.backend import SpanBackend  # noqa: E402
from corolla.platform.calibration import Setup, _backend, _backward, _forward, _grad_output, _steps  # noqa: E402
from corolla.verify.events import AuditEvent, Comparison, Subject, Verdict, Work  # noqa: E402
from corolla.verify.events import Run as RunRecord  # noqa: E402
from corolla.verify.reputation import ReputationBook, severity  # noqa: E402
from corolla.verify.spot_check import judge  # noqa: E402
from corolla.verify.tolerance import Tolerance, compare, load_table, tolerance_for  # noqa: E402

RESULTS = HERE / "results" / "verification_real.json"
SPANS = ((0, 15), (15, 30))
STEPS = 3
KINDS = ("noise", "skip-block", "other-weights")
PROMPTS = (
    "The patient presented with fever and a persistent cough.",
    "Symptoms of type 2 diabetes include",
    "After the knee surgery, the physiotherapist recommended",
    "A 54-year-old woman reports chest pain radiating to the left arm.",
    "The discharge summary notes that the patient",
)
NODES = {  # node name -> its setup; two float32 nodes differ by batch split (f32b computes row by row)
    "f32a": Setup(precision="float32", dtype="float32"),
    "f32b": Setup(precision="float32", dtype="float32"),
    "bf16": Setup(precision="bfloat16", dtype="bfloat16"),
    "int8": Setup(precision="int8", dtype="float32", quant="int8"),
}
CORRUPT_PRIMARIES = ("f32a", "int8")


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    requests: int  # real requests (each: both spans, every node, three works)
    honest_audits: int
    trials_always: int
    trials_rare: int
    prompts: int  # real `platform generate` runs
    new_tokens: int
    rare_window: int = 600
    always_window: int = 10


FULL = Plan(requests=3, honest_audits=10_000, trials_always=200, trials_rare=1000, prompts=2, new_tokens=6)
QUICK = Plan(requests=1, honest_audits=500, trials_always=20, trials_rare=100, prompts=1, new_tokens=4)


# -- part 1: real recomputes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outputs:
    forward: torch.Tensor  # (B, T, H)
    steps: torch.Tensor  # (B, STEPS, H): cached one-token steps
    backward: torch.Tensor  # (B, T, H): input gradient


def _rotated(backend: SpanBackend) -> SpanBackend:
    blocks = list(backend.span.blocks)
    backend.span.blocks = nn.ModuleList(blocks[1:] + blocks[:1])
    return backend


def _run(backend: SpanBackend, x: torch.Tensor, grad: torch.Tensor, seg: tuple[tuple[int, int], ...]) -> Outputs:
    return Outputs(
        forward=_forward(backend, x, seg),
        steps=_steps(backend, x, STEPS, seg),
        backward=_backward(backend, x, grad, seg),
    )


def _by_rows(backend: SpanBackend, x: torch.Tensor, grad: torch.Tensor, seg: tuple[tuple[int, int], ...]) -> Outputs:
    rows = [_run(backend, x[i : i + 1], grad[i : i + 1], seg) for i in range(x.shape[0])]
    return Outputs(*(torch.cat([getattr(r, f) for r in rows]) for f in ("forward", "steps", "backward")))


def _parts(out: Outputs, work: Work, *, as_check: bool) -> torch.Tensor:
    """What an audit compares: a check re-runs an inference step as a parallel forward."""
    if work == Work.FORWARD:
        return out.forward
    if work == Work.BACKWARD:
        return out.backward
    return out.forward[:, -STEPS:] if as_check else out.steps


@dataclass(frozen=True, slots=True)
class Verdicts:
    """Real judged audits: (span, work, primary node, check, referee) -> the event's figures."""

    honest: list[dict[str, Any]]
    corrupt: dict[tuple[str, str], list[dict[str, Any]]]  # (kind, corrupt node) -> audits


def _audit(
    primary: torch.Tensor, check: torch.Tensor, referee: torch.Tensor, tols: tuple[Tolerance, Tolerance, Tolerance]
) -> dict[str, Any]:
    vs_check = compare(primary, check, tols[0])
    rp = rc = None
    if not vs_check.agree:
        rp, rc = compare(primary, referee, tols[1]), compare(check, referee, tols[2])
    verdict, blamed = judge(vs_check, rp, rc)
    return {"comparison": vs_check, "tolerance": tols[0], "verdict": verdict, "blamed": blamed}


def measure(model: Path, plan: Plan, say: Any) -> tuple[Verdicts, dict[str, Any]]:
    checkpoint = Checkpoint.open(model)
    model_id, hidden_size = checkpoint.model_id, checkpoint.hidden_size
    client = checkpoint.load_client()
    table = load_table()
    gen = torch.Generator().manual_seed(7)
    honest: list[dict[str, Any]] = []
    corrupt: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    started = time.monotonic()
    backends = {(n, s): _backend(checkpoint, setup, *s) for n, setup in NODES.items() for s in SPANS}
    wrong = {(n, s): _rotated(_backend(checkpoint, NODES[n], *s)) for n in CORRUPT_PRIMARIES for s in SPANS}
    say(f"  loaded {len(backends) + len(wrong)} span backends in {time.monotonic() - started:.1f} s")

    def tol(a: str, b: str, work: Work) -> Tolerance:
        pa, pb = NODES[a].precision, NODES[b].precision
        return tolerance_for(pa, pb, work, table=table, model_id=model_id, hidden_size=hidden_size)

    for request in range(plan.requests):
        t0 = time.monotonic()
        tokens = int(torch.randint(8, 25, (), generator=gen))
        ids = torch.randint(2, int(checkpoint.config.vocab_size), (2, tokens), generator=gen)
        x0 = client.embed(ids)
        mid = _forward(backends["f32a", SPANS[0]], x0, (SPANS[0],)).clone()  # a normal tensor, as from the wire
        out_final = _forward(backends["f32a", SPANS[1]], mid, (SPANS[1],))
        grad_final = _grad_output(client, out_final, ids)
        grad_mid = _backward(backends["f32a", SPANS[1]], mid, grad_final, (SPANS[1],))
        for span, x, grad in ((SPANS[0], x0, grad_mid), (SPANS[1], mid, grad_final)):
            seg = (span,)
            outs = {
                n: (_by_rows if n == "f32b" else _run)(backends[n, span], x, grad, seg) for n in NODES
            }  # honest answers
            bad: dict[tuple[str, str], Outputs] = {}
            for n in CORRUPT_PRIMARIES:
                o = outs[n]
                noise = {f: torch.randn(getattr(o, f).shape, generator=gen) for f in ("forward", "steps", "backward")}
                bad["noise", n] = Outputs(
                    *(getattr(o, f) + 0.25 * noise[f] * _rms(getattr(o, f)) for f in ("forward", "steps", "backward"))
                )
                bad["skip-block", n] = _run(backends[n, span], x, grad, ((span[0], span[1] - 1),))
                bad["other-weights", n] = _run(wrong[n, span], x, grad, seg)
            for work in Work:
                for p, c, r in itertools.permutations(NODES, 3):
                    a = _audit(
                        _parts(outs[p], work, as_check=False),
                        _parts(outs[c], work, as_check=True),
                        _parts(outs[r], work, as_check=True),
                        (tol(p, c, work), tol(p, r, work), tol(c, r, work)),
                    )
                    honest.append({**a, "span": span, "work": work, "primary": p, "check": c, "referee": r})
                for (kind, p), o in bad.items():
                    for c, r in itertools.permutations([n for n in NODES if n != p], 2):
                        a = _audit(
                            _parts(o, work, as_check=False),
                            _parts(outs[c], work, as_check=True),
                            _parts(outs[r], work, as_check=True),
                            (tol(p, c, work), tol(p, r, work), tol(c, r, work)),
                        )
                        corrupt[kind, p].append({**a, "span": span, "work": work, "primary": p, "check": c})
        say(f"  request {request + 1}/{plan.requests}: 2 rows of {tokens} tokens, {time.monotonic() - t0:.1f} s")
    info = {
        "model_id": model_id,
        "tolerance_match": tolerance_for(
            "int8", "float32", Work.FORWARD, table=table, model_id=model_id, hidden_size=hidden_size
        ).match.value,
        "seconds": round(time.monotonic() - started, 1),
    }
    return Verdicts(honest=honest, corrupt=dict(corrupt)), info


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean(dim=-1, keepdim=True).sqrt()


# -- part 1: the policy over real verdicts ---------------------------------------------------------

_DIGEST = hashlib.sha256(b"verification_real").hexdigest()


def _event(audit: dict[str, Any], node: str) -> AuditEvent:
    """The audit as a ledger event about `node` (validated once per audit and node, then copied
    under fresh ids: the book ignores an event id it has seen)."""
    key = (id(audit), node)
    base = _EVENTS.get(key)
    if base is None:
        span = audit["span"]
        subject = Subject(node_id=node, model_id="smollm2", start=span[0], end=span[1])
        check = audit["check"]
        blamed = Subject(node_id=check, model_id="smollm2", start=span[0], end=span[1]) if audit["blamed"] else None
        tol: Tolerance = audit["tolerance"]
        run = RunRecord(node_id=node, precision="float32", output_sha256=_DIGEST)
        base = _EVENTS[key] = AuditEvent(
            event_id=uuid.uuid4().hex,
            at=0.0,
            reporter="benchmark",
            subject=subject,
            work=audit["work"],
            input_sha256=_DIGEST,
            primary=run,
            check=run.model_copy(update={"node_id": check}),
            comparison=audit["comparison"],
            tolerance_rel_l2=tol.rel_l2,
            tolerance_max_abs=tol.max_abs,
            verdict=audit["verdict"],
            blamed=blamed,
        )
    fields = dict(base)
    fields["event_id"] = f"e{next(_IDS)}"
    return AuditEvent.model_construct(**fields)


_EVENTS: dict[tuple[int, str], AuditEvent] = {}
_IDS = itertools.count()


def honest_policy(v: Verdicts, plan: Plan, rng: random.Random) -> dict[str, Any]:
    book = ReputationBook()
    verdicts: Counter[str] = Counter()
    quarantines = 0
    for _ in range(plan.honest_audits):
        audit = rng.choice(v.honest)
        verdicts[audit["verdict"].value] += 1
        quarantines += len(book.observe_all(_event(audit, audit["primary"])))
    distinct: Counter[str] = Counter(a["verdict"].value for a in v.honest)
    worst: dict[str, float] = {}
    for a in v.honest:
        pair = "/".join(sorted((NODES[a["primary"]].precision, NODES[a["check"]].precision)))
        key = f"{a['work'].value} {pair}"
        t: Tolerance = a["tolerance"]
        c: Comparison = a["comparison"]
        worst[key] = max(worst.get(key, 0.0), c.rel_l2 / t.rel_l2, c.max_abs / t.max_abs)
    return {
        "audits": plan.honest_audits,
        "quarantines": quarantines,
        "verdicts_drawn": dict(verdicts),
        "distinct_real_verdicts": len(v.honest),
        "distinct_verdicts": dict(distinct),
        "distinct_disagreements": sum(not a["comparison"].agree for a in v.honest),
        "largest_honest_fraction_of_tolerance": {k: round(x, 4) for k, x in sorted(worst.items())},
    }


def _trial(pool: list[dict[str, Any]], honest: list[dict[str, Any]], f: float, window: int, rng: random.Random) -> int:
    """Audits of the corrupt node until its quarantine (window + 1: not within the window)."""
    book = ReputationBook()
    for n in range(1, window + 1):
        audit = rng.choice(pool) if rng.random() < f else rng.choice(honest)
        if book.observe_all(_event(audit, "bad")):
            return n
    return window + 1


def detection(v: Verdicts, plan: Plan, rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (kind, node), pool in sorted(v.corrupt.items()):
        honest = [a for a in v.honest if a["primary"] == node]
        always = [_trial(pool, honest, 1.0, 50, rng) for _ in range(plan.trials_always)]
        rare = [_trial(pool, honest, 0.01, plan.rare_window, rng) for _ in range(plan.trials_rare)]
        fails = [a for a in pool if a["verdict"] == Verdict.FAIL]
        out[f"{kind} by {NODES[node].precision}"] = {
            "distinct_real_verdicts": len(pool),
            "distinct_verdicts": dict(Counter(a["verdict"].value for a in pool)),
            "gross_fail_share": round(sum(severity(_event(a, "bad")) >= 4.0 for a in fails) / len(fails), 4)
            if fails
            else 0.0,
            "always_audits_to_quarantine_max": max(always),
            "always_within_10": sum(n <= plan.always_window for n in always) / len(always),
            "rare_quarantined_within_600": sum(n <= plan.rare_window for n in rare) / len(rare),
            "rare_trials": len(rare),
        }
    return out


# -- part 2: real `platform serve` processes -------------------------------------------------------


def served(model: Path, plan: Plan, say: Any) -> dict[str, Any]:
    from corolla.platform.launch.servers import LocalServers
    from corolla.verify.ledger import Ledger

    spans = [(0, 30)] * 3  # whole-model replicas: 3 processes start in reasonable time on 2 shared cores
    per_server = [[], ["--quant", "int8"], []]
    runs = []
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="corolla-vreal-") as tmp,
        LocalServers(model, spans, per_server_args=per_server, torch_threads=1, start_timeout=600) as servers,
    ):
        say(f"  3 servers up in {time.monotonic() - started:.1f} s: {servers.endpoints}")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for i, prompt in enumerate(PROMPTS[: plan.prompts]):
            ledger = Path(tmp) / f"ledger-{i}.db"
            cmd = [sys.executable, "-m", "corolla", "generate", prompt, "--model", str(model), "--insecure"]
            cmd += ["--max-new-tokens", str(plan.new_tokens), "--audit-rate", "1.0", "--ledger", str(ledger)]
            cmd += ["--workspace", str(Path(tmp) / "ws")]
            for endpoint in servers.endpoints:
                cmd += ["--servers", endpoint]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
            events = []
            if ledger.exists():
                with Ledger.open_readonly(str(ledger)) as opened:
                    events = [stored.event for stored in opened.events()]
            audits = [e for e in events if e.kind == "audit"]
            runs.append(
                {
                    "exit": proc.returncode,
                    "seconds": round(time.monotonic() - t0, 1),
                    "audits": len(audits),
                    "verdicts": dict(Counter(e.verdict.value for e in audits)),  # type: ignore[union-attr]
                    "pairs": dict(
                        Counter(f"{e.primary.precision}/{e.check.precision}" for e in audits)  # type: ignore[union-attr]
                    ),
                    "quarantines": sum(e.kind == "quarantine" for e in events),
                    "largest_fraction_of_tolerance": round(
                        max((severity(e) for e in audits), default=0.0),
                        4,  # type: ignore[arg-type]
                    ),
                    "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
                }
            )
            say(f"  generate {i + 1}/{plan.prompts}: {runs[-1]}")
    return {
        "servers": "blocks 0:30: float32, int8, float32 (3 `platform serve` processes, 1 thread each)",
        "runs": runs,
        "audits": sum(r["audits"] for r in runs),
        "quarantines": sum(r["quarantines"] for r in runs),
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    run = Run("verification_real", quick=args.quick, machine=machine_info())

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    model = Path(cached_import())
    say("part 1: real recomputes in process")
    verdicts, info = measure(model, plan, say)
    rng = random.Random(0)
    result = run.result
    result["in_process"] = {
        **info,
        "honest": honest_policy(verdicts, plan, rng),
        "detection": detection(verdicts, plan, rng),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")  # part 1 kept if part 2 is cut short
    say("part 2: real platform serve processes")
    try:
        result["served"] = served(model, plan, say)
    except Exception as exc:  # recorded, not hidden: the figures of part 1 stand on their own
        result["served"] = {"error": f"{type(exc).__name__}: {exc}", "audits": 0, "quarantines": None}
    honest = result["in_process"]["honest"]
    det = result["in_process"]["detection"]
    result["targets"] = {
        "honest_in_process_quarantines_0": honest["quarantines"] == 0,
        "served_quarantines_0": result["served"]["quarantines"] == 0 and result["served"]["audits"] > 0,
        "always_within_10": {k: d["always_audits_to_quarantine_max"] <= plan.always_window for k, d in det.items()},
        "rare_within_600_at_99": {k: d["rare_quarantined_within_600"] >= 0.99 for k, d in det.items()},
    }
    run.finish(args.out)
    run.print_written()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
