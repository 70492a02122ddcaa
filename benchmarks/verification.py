"""Verification overhead benchmark: spot checks on the request path, the ledger, audit reports.

(a) Generation: in-process `BlockServer`s (gRPC on loopback, no DHT) on a tiny Llama
    (4 blocks, hidden 64), three float32 replicas of each of the spans 0:2 and 2:4, so an
    audit always finds a check server and a referee. Two `RemoteModelForCausalLM` clients on
    the same servers: one with a `SpotChecker` at r = 5% (background worker, the default),
    one without (r = 0). Per-step latency of greedy decoding (embed + `session.step` + head,
    the loop `benchmarks/inference.py` times), p50 / p95, and the checker's counters.
(b) Training step: one DP-LoRA step (r = 8 on q,v, Adam, flat clipping, noise 1.0, clip 1.0,
    batch 8 x 128, loss on the last 16 positions) through the same servers with
    `RemoteTrainer`, one client with a checker at r = 5% and one without; p50 / p95 ms/step.
(c) Ledger throughput: `measure_throughput` (append in transactions of 100 events, then read
    and verify the whole ledger) on SQLite (a temporary file) and PostgreSQL (a database
    created for the run and dropped after), on synthetic audit events.
(d) Report: `benchmark_report(100_000)`: a real SQLite ledger of 100,000 synthetic events,
    read, checked, replayed into a report and rendered (one pass, as `platform audit report`
    does, and the former two passes for comparison).

Fairness on a shared machine: in (a) and (b) the two variants run in rounds, one block of
work each (a generation of N tokens; K training steps), the order alternating each round,
so that drifting background load hits both alike. The checked variant's audits run in the
checker's worker thread while the next steps go on; after each checked block the benchmark
waits for the audits still queued (`checker.flush()`, timed apart as `tail_flush_ms`, not
part of any step), so that no audit of the checked variant runs during the baseline's
block. Every server and both clients live in this process (one torch thread), so an
audit's re-runs on the check server compete with the client for the same two cores: on a
swarm of separate machines they would not. In (c) the two backends alternate the same way,
round by round, each round appending new events to the same ledger.

Results go to `benchmarks/results/verification.json`; a summary is printed.

    python benchmarks/verification.py            # full run: 2.5 to 3.5 minutes on 2 cores
    python benchmarks/verification.py --quick    # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Opacus ships a top-level `benchmarks` package that shadows this directory: import the
# shared helpers and the training benchmark's by path, as training.py does.
sys.path[:0] = [str(HERE)]

import psycopg  # noqa: E402
import sqlalchemy  # noqa: E402
import torch  # noqa: E402
import training as training_bench  # noqa: E402  (benchmarks/training.py)
from _results import Run, machine_info, summary_ms, torch_stack, warn_if_loaded  # noqa: E402

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM  # noqa: E402
from corolla.inference.discovery import ServerRecord  # noqa: E402
from corolla.inference.models.tiny import TinySpec, init_tiny  # noqa: E402
from corolla.inference.server import BlockServer, ServerConfig  # noqa: E402
from corolla.training.remote_trainer import RemoteTrainer  # noqa: E402
from corolla.verify.events import AuditEvent, QuarantineEvent  # noqa: E402
from corolla.verify.ledger import Ledger, LedgerKey  # noqa: E402
from corolla.verify.ledger.throughput import measure_throughput  # noqa: E402
from corolla.verify.report.synthetic import benchmark_report, synthetic_events  # noqa: E402
from corolla.verify.reputation import ReputationBook  # noqa: E402
from corolla.verify.spot_check import SpotChecker, SpotCheckSettings  # noqa: E402

RESULTS = HERE / "results" / "verification.json"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"  # trust auth, as the ledger tests use
Event = AuditEvent | QuarantineEvent


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    rate: float = 0.05  # audit rate of the checked variant
    spans: tuple[tuple[int, int], ...] = ((0, 2), (2, 4))
    replicas: int = 3  # servers per span: primary, check and referee
    prompt_tokens: int = 16
    new_tokens: int = 64  # per generation: 1 from the prefill + (new_tokens - 1) timed steps
    gen_warmup: int = 2  # untimed generations per variant
    gen_rounds: int = 100  # timed generations per variant, interleaved
    train_batch: int = 8
    train_tokens: int = 128
    train_completion: int = 16  # loss positions per record, at the end
    train_warmup: int = 2  # untimed steps per variant
    train_rounds: int = 30  # rounds of `train_block` steps per variant, interleaved
    train_block: int = 4  # consecutive steps per variant per round
    ledger_rounds: int = 5  # rounds per backend, interleaved
    ledger_events: int = 10_000  # new events per round and backend
    ledger_batch: int = 100  # events per append transaction
    report_events: int = 100_000

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate={self.rate} must be in (0, 1]")
        for name in ("gen_rounds", "train_rounds", "train_block", "ledger_rounds", "ledger_events", "report_events"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens={self.new_tokens} must be at least 2 (one prefill, one timed step)")
        if self.replicas < 3:
            raise ValueError(f"replicas={self.replicas}: an audit needs a check and a referee besides the primary")


FULL = Plan()
QUICK = Plan(
    new_tokens=24,
    gen_warmup=1,
    gen_rounds=3,
    train_batch=4,
    train_tokens=64,
    train_warmup=1,
    train_rounds=2,
    train_block=2,
    ledger_rounds=2,
    ledger_events=300,
    report_events=3000,
)
TINY = TinySpec(arch="llama")  # hidden 64, 4 blocks, 4 heads / 2 KV heads, MLP 128, vocab 512


# -- statistics ---------------------------------------------------------------------------------


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    """p50 / p95 / mean / min / max in milliseconds of durations in seconds."""
    return summary_ms(seconds, tail=0.95, digits=3)


def compared(baseline: list[float], checked: list[float], rounds: list[tuple[float, float]]) -> dict[str, Any]:
    """Both variants' percentiles and the ratios checked / baseline; `rounds` holds each
    round's (baseline median, checked median), whose ratios' median cancels drifting load."""
    base, check = percentiles_ms(baseline), percentiles_ms(checked)
    return {
        "r0": base,
        "r5pct": check,
        "ratio_p50": round(check["p50"] / base["p50"], 3),
        "ratio_p95": round(check["p95"] / base["p95"], 3),
        "ratio_paired_median": round(statistics.median(c / b for b, c in rounds), 3),
    }


# -- the swarm --------------------------------------------------------------------------------


class Lab:
    """In-process servers of one model; stopped with the stack."""

    def __init__(self, model: Path, stack: ExitStack) -> None:
        self.model = model
        self.stack = stack

    def server(self, blocks: tuple[int, int]) -> BlockServer:
        server = BlockServer(ServerConfig(model=self.model, blocks=blocks, dht=False)).start()
        self.stack.callback(server.stop, 0)
        return server

    def client(self, servers: Sequence[BlockServer]) -> RemoteModelForCausalLM:
        model = RemoteModelForCausalLM.from_pretrained(self.model, servers=[s.endpoint for s in servers])
        self.stack.callback(model.close)
        return model


class TimedSpotChecker(SpotChecker):
    """A `SpotChecker` that timestamps, for this benchmark only, what it does on the caller's
    path and each audit it runs in its worker (re-run, referee if needed, comparison, book,
    sink). On the caller's path: the hook after each span computation, which draws whether
    to audit it ("draw") and, when drawn, copies what the audit needs and queues it
    ("queue"); and `excludes` ("exclude"), which routing and an open session ask before each
    step whether a node is quarantined."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[tuple[float, float, str]] = []  # (start, end, kind), perf_counter seconds
        self.audits: list[tuple[float, float]] = []
        super().__init__(*args, **kwargs)

    def _maybe_submit(self, *args: Any, **kwargs: Any) -> None:
        before = self._counts["sampled"]  # only this (the caller's) thread changes it
        t0 = time.perf_counter()
        super()._maybe_submit(*args, **kwargs)
        self.calls.append((t0, time.perf_counter(), "queue" if self._counts["sampled"] > before else "draw"))

    def excludes(self, record: ServerRecord) -> bool:
        t0 = time.perf_counter()
        out = super().excludes(record)
        if threading.current_thread() is not self._worker:  # the worker's own route look-ups are off the path
            self.calls.append((t0, time.perf_counter(), "exclude"))
        return out

    def _run(self, work: Any) -> None:
        t0 = time.perf_counter()
        super()._run(work)
        self.audits.append((t0, time.perf_counter()))


class Checked:
    """A spot checker at `rate` (background worker) with a fresh book, collecting its events."""

    def __init__(self, rate: float, seed: int) -> None:
        self.events: list[Event] = []
        # seeded draws (production uses SystemRandom): the same audits on every run of the benchmark
        self.checker = TimedSpotChecker(
            ReputationBook(),
            sink=self.events.extend,
            reporter="benchmark",
            settings=SpotCheckSettings(rate=rate),
            rng=random.Random(seed),
        )
        self.flushes: list[float] = []

    def flush(self) -> None:
        """Wait for the audits still queued (timed: what a caller waits for at the end of a block)."""
        t0 = time.perf_counter()
        if not self.checker.flush(120.0):
            raise RuntimeError("spot checks still running after 120 s")
        self.flushes.append(time.perf_counter() - t0)

    def report(self, intervals: list[tuple[float, float]]) -> dict[str, Any]:
        """Counters and verdicts, and where the time of the timed `intervals` (steps) went."""
        audits = [e for e in self.events if isinstance(e, AuditEvent)]
        return {
            "stats": asdict(self.checker.stats()),
            "audits_by_work": dict(Counter(a.work.value for a in audits)),
            "verdicts": dict(Counter(a.verdict.value for a in audits)),
            "quarantines": sum(isinstance(e, QuarantineEvent) for e in self.events),
            "tail_flush_ms": percentiles_ms(self.flushes) if self.flushes else None,
            "where_the_time_goes": self.breakdown(intervals),
        }

    def breakdown(self, intervals: list[tuple[float, float]]) -> dict[str, Any]:
        """Per timed step: the checker's time in it on the caller's path, by kind, and whether
        an audit was running in the worker meanwhile (the step then shares the CPU and the GIL
        with it, and with the check server's re-run, all in this process)."""
        calls = sorted(self.checker.calls)
        starts = [c[0] for c in calls]
        audits = sorted(self.checker.audits)
        kinds = ("draw", "queue", "exclude")
        per_call: dict[str, list[float]] = {kind: [] for kind in kinds}
        per_step: list[float] = []
        overlapped: list[float] = []
        clear: list[float] = []
        for a, b in intervals:
            total = 0.0
            for s, e, kind in calls[bisect.bisect_left(starts, a) : bisect.bisect_right(starts, b)]:
                if e <= b:
                    per_call[kind].append(e - s)
                    total += e - s
            per_step.append(total)
            busy = any(s < b and a < e for s, e in audits)
            (overlapped if busy else clear).append(b - a)
        return {
            "caller_path_ms_per_step": percentiles_ms(per_step) if per_step else None,
            "caller_path_ms_per_call": {
                kind: percentiles_ms(per_call[kind]) if per_call[kind] else {"n": 0} for kind in kinds
            },
            "audit_run_ms": percentiles_ms([e - s for s, e in audits]) if audits else None,
            "steps_overlapping_an_audit": percentiles_ms(overlapped) if overlapped else {"n": 0},
            "steps_clear_of_audits": percentiles_ms(clear) if clear else {"n": 0},
        }


def timed_generation(
    model: RemoteModelForCausalLM, prompt: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Greedy decoding, as `remote_generation` in benchmarks/inference.py, keeping each timed step's
    (start, end) rather than its duration; the prefill step is not timed."""
    parts = model.client_parts
    session = model.inference_session(max_length=prompt.shape[1] + new_tokens, batch_size=prompt.shape[0])
    steps: list[tuple[float, float]] = []
    try:
        hidden = session.step(parts.embed(prompt, 0))
        token = torch.argmax(parts.head(hidden[:, -1:])[:, -1].float(), dim=-1)
        out = [token]
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            hidden = session.step(parts.embed(token[:, None], session.position))
            token = torch.argmax(parts.head(hidden[:, -1:])[:, -1].float(), dim=-1)
            steps.append((t0, time.perf_counter()))
            out.append(token)
    finally:
        session.close()
    return torch.cat([prompt, torch.stack(out, dim=1)], dim=1), steps


def durations(intervals: list[tuple[float, float]]) -> list[float]:
    return [b - a for a, b in intervals]


# -- (a) generation ---------------------------------------------------------------------------


def bench_generation(lab: Lab, servers: list[BlockServer], plan: Plan) -> dict[str, Any]:
    plain = lab.client(servers)
    checked_model = lab.client(servers)
    checked = Checked(plan.rate, seed=1)
    checked_model.use_spot_checker(checked.checker)
    prompt = torch.randint(2, TINY.vocab_size - 16, (1, plan.prompt_tokens), generator=torch.Generator().manual_seed(0))
    variants = {"r0": plain, "r5pct": checked_model}
    steps: dict[str, list[tuple[float, float]]] = {"r0": [], "r5pct": []}
    tokens: dict[str, list[torch.Tensor]] = {"r0": [], "r5pct": []}
    rounds: list[tuple[float, float]] = []
    with torch.inference_mode():
        for model in variants.values():
            for _ in range(plan.gen_warmup):
                timed_generation(model, prompt, plan.new_tokens)
        checked.flush()
        checked.flushes.clear()
        began = time.perf_counter()
        for rep in range(plan.gen_rounds):
            medians: dict[str, float] = {}
            for name in ("r0", "r5pct") if rep % 2 == 0 else ("r5pct", "r0"):
                ids, run = timed_generation(variants[name], prompt, plan.new_tokens)
                if name == "r5pct":
                    checked.flush()
                steps[name].extend(run)
                tokens[name].append(ids)
                medians[name] = statistics.median(durations(run))
            rounds.append((medians["r0"], medians["r5pct"]))
        seconds = time.perf_counter() - began
    first = tokens["r0"][0]
    report = checked.report(steps["r5pct"])
    checked.checker.close()
    hops = len(plan.spans)
    return {
        "config": {
            "model": asdict(TINY),
            "servers": [f"{a}:{b} x {plan.replicas}" for a, b in plan.spans],
            "prompt_tokens": plan.prompt_tokens,
            "new_tokens": plan.new_tokens,
            "timed_steps_per_generation": plan.new_tokens - 1,
            "warmup_generations": plan.gen_warmup,
            "rounds": plan.gen_rounds,
            "rate": plan.rate,
            "statistic": "wall time of one decode step (embed + session.step through 2 hops + head), prefill and "
            "session open excluded; one generation per variant per round, the order alternating",
        },
        "step_ms": compared(durations(steps["r0"]), durations(steps["r5pct"]), rounds),
        # every session step of every hop is a span computation the checker may draw
        "span_computations_checked_variant": (plan.gen_warmup + plan.gen_rounds) * plan.new_tokens * hops,
        "checker": report,
        "tokens_identical": all(bool(torch.equal(t, first)) for ts in tokens.values() for t in ts),
        "seconds": round(seconds, 1),
    }


# -- (b) training step ------------------------------------------------------------------------


def bench_training(lab: Lab, servers: list[BlockServer], plan: Plan) -> dict[str, Any]:
    cfg = training_bench.TrainBench(
        name="tiny",
        spec=TINY,
        spans=plan.spans,
        targets=training_bench.Q_V,
        rank=8,
        batch=plan.train_batch,
        tokens=plan.train_tokens,
        completion_tokens=plan.train_completion,
        warmup=plan.train_warmup,
        repeats=plan.train_rounds * plan.train_block,
        server_threads=1,
        local_threads=1,
    )
    dp = training_bench.DP
    plain = lab.client(servers)
    checked_model = lab.client(servers)
    checked = Checked(plan.rate, seed=2)
    checked_model.use_spot_checker(checked.checker)
    settings = LoraSettings(r=cfg.rank, alpha=2.0 * cfg.rank, targets=cfg.targets)
    start = LoraAdapter.init(plain.checkpoint, settings, seed=0)
    trainers = {
        name: RemoteTrainer(
            model,
            LoraAdapter(plain.checkpoint, settings, start.state()),
            lr=dp.lr,
            exchange="flat",
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=cfg.batch,
            generator=torch.Generator().manual_seed(1),
        )
        for name, model in (("r0", plain), ("r5pct", checked_model))
    }
    batches = training_bench.make_batches(cfg, TINY.vocab_size, cfg.warmup + cfg.repeats)
    times: dict[str, list[tuple[float, float]]] = {"r0": [], "r5pct": []}
    losses: dict[str, list[float]] = {"r0": [], "r5pct": []}
    rounds: list[tuple[float, float]] = []
    for name, trainer in trainers.items():
        for k in range(cfg.warmup):
            losses[name].append(trainer.step(batches[k]))
    checked.flush()
    checked.flushes.clear()
    began = time.perf_counter()
    for rep in range(plan.train_rounds):
        medians: dict[str, float] = {}
        for name in ("r0", "r5pct") if rep % 2 == 0 else ("r5pct", "r0"):
            block = []
            for k in range(plan.train_block):
                batch = batches[cfg.warmup + rep * plan.train_block + k]
                t0 = time.perf_counter()
                losses[name].append(trainers[name].step(batch))
                block.append((t0, time.perf_counter()))
            if name == "r5pct":
                checked.flush()
            times[name].extend(block)
            medians[name] = statistics.median(durations(block))
        rounds.append((medians["r0"], medians["r5pct"]))
    seconds = time.perf_counter() - began
    report = checked.report(times["r5pct"])
    checked.checker.close()
    hops = len(plan.spans)
    return {
        "config": {
            "model": asdict(TINY),
            "servers": [f"{a}:{b} x {plan.replicas}" for a, b in plan.spans],
            "lora": {"r": cfg.rank, "alpha": 2.0 * cfg.rank, "targets": list(cfg.targets)},
            "batch": cfg.batch,
            "tokens": cfg.tokens,
            "loss_positions_per_record": cfg.completion_tokens,
            "exchange": "flat",
            "dp": asdict(dp),
            "warmup_steps": cfg.warmup,
            "rounds": plan.train_rounds,
            "steps_per_round_per_variant": plan.train_block,
            "rate": plan.rate,
            "statistic": "wall time of RemoteTrainer.step(batch); both variants take step k on batch k from the same "
            "adapter; blocks of consecutive steps per variant, the order alternating each round",
        },
        "step_ms": compared(durations(times["r0"]), durations(times["r5pct"]), rounds),
        # a step is a forward and a backward through each hop
        "span_computations_checked_variant": (cfg.warmup + cfg.repeats) * 2 * hops,
        "checker": report,
        "losses_identical": losses["r0"] == losses["r5pct"],
        "seconds": round(seconds, 1),
    }


# -- (c) ledger throughput ----------------------------------------------------------------------


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server, dropped afterwards."""
    admin = psycopg.connect(PG_SERVER.replace("+psycopg", "") + "/postgres", autocommit=True, connect_timeout=3)
    name = f"corolla_bench_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def bench_ledger(plan: Plan, workdir: Path) -> dict[str, Any]:
    key = LedgerKey.generate()
    public = key.public_key()
    out: dict[str, Any] = {
        "config": {
            "rounds": plan.ledger_rounds,
            "events_per_round": plan.ledger_events,
            "batch": plan.ledger_batch,
            "events": "synthetic_events(seed=round): ~98% audits (8 servers on 2 spans, one corrupting 2%), "
            "quarantines and re-admissions; canonical JSON bodies of about 1 kB",
            "statistic": "per round, measure_throughput appends the round's new events in transactions of "
            "`batch`, then reads and verifies the whole ledger (so read/verify cover all earlier rounds too); "
            "the backends alternate, the order alternating each round; figures are medians over rounds",
        },
    }
    with ExitStack() as stack:
        ledgers: dict[str, Ledger] = {}
        sqlite_path = workdir / "ledger.db"
        ledgers["sqlite"] = stack.enter_context(Ledger.open(sqlite_path, key=key, writer="benchmark"))
        try:
            url = stack.enter_context(postgres_database())
            ledgers["postgresql"] = stack.enter_context(Ledger.open(url, key=key, writer="benchmark"))
            version = psycopg.connect(PG_SERVER.replace("+psycopg", "") + "/postgres", connect_timeout=3)
            with version:
                out["postgresql_server"] = str(version.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        except Exception as exc:  # unreachable, or no rights: record why and go on with SQLite
            out["postgresql"] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}
            print(f"(c) PostgreSQL skipped: {out['postgresql']['error']}", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ledgers}
        names = list(ledgers)
        for rep in range(plan.ledger_rounds):
            events = list(synthetic_events(plan.ledger_events, seed=rep))
            for name in names if rep % 2 == 0 else names[::-1]:
                t = measure_throughput(ledgers[name], events, public, batch=plan.ledger_batch)
                runs[name].append({**asdict(t), "ledger_events": ledgers[name].count()})
        for name, rows in runs.items():
            out[name] = {
                "append_per_s": round(statistics.median(r["append_per_s"] for r in rows)),
                "read_per_s": round(statistics.median(r["read_per_s"] for r in rows)),
                "verify_per_s": round(statistics.median(r["verify_per_s"] for r in rows)),
                "rounds": [
                    {k: round(v) if isinstance(v, float) else v for k, v in r.items() if k not in ("batch",)}
                    for r in rows
                ],
            }
            print(
                f"(c) {name}: append {out[name]['append_per_s']}/s, read {out[name]['read_per_s']}/s, "
                f"verify {out[name]['verify_per_s']}/s",
                flush=True,
            )
    return out


# -- report -------------------------------------------------------------------------------------


def headline(result: dict[str, Any]) -> dict[str, Any]:
    def latency(part: dict[str, Any]) -> dict[str, Any]:
        s = part["step_ms"]
        return {
            "r0_p50_ms": s["r0"]["p50"],
            "r0_p95_ms": s["r0"]["p95"],
            "r5pct_p50_ms": s["r5pct"]["p50"],
            "r5pct_p95_ms": s["r5pct"]["p95"],
            "ratio_p50": s["ratio_p50"],
            "ratio_p95": s["ratio_p95"],
            "ratio_paired_median": s["ratio_paired_median"],
            "audits": part["checker"]["stats"]["audits"],
            "dropped": part["checker"]["stats"]["dropped"],
        }

    ledger = result["ledger"]
    report = result["report"]
    return {
        "generation_step": latency(result["generation"]),
        "training_step": latency(result["training"]),
        "ledger_events_per_s": {
            name: (
                {k: ledger[name][k] for k in ("append_per_s", "read_per_s", "verify_per_s")}
                if "error" not in ledger[name]
                else ledger[name]
            )
            for name in ("sqlite", "postgresql")
            if name in ledger
        },
        "report": {
            "events": report["n_events"],
            "build_report_s": report["build_report_s"],
            "report_total_s": report["report_total_s"],
            "report_total_cpu_s": report["report_total_cpu_s"],
            "report_two_pass_s": report["report_two_pass_s"],
            "note": "report_total = ledger_report (one read: check the chain, parse, replay) + render HTML: what "
            "`platform audit report` spends; report_two_pass = verify, then build_report reading the ledger "
            "again, + HTML (the command before Ledger.scan)",
        },
    }


def print_summary(result: dict[str, Any]) -> None:
    m = result["machine"]
    other = m["cpu_during_run"]["other_cpu_share"]
    print(
        f"\nCorolla verification benchmark ({result['mode']}), {m['cores']} cores, torch {m['torch']}, "
        f"load {m['loadavg_at_start']} -> {m['loadavg_at_end']}, other processes took "
        f"{other if other is None else f'{other:.0%}'} of the CPU meanwhile"
    )
    h = result["headline"]
    for part in ("generation_step", "training_step"):
        p = h[part]
        print(
            f"{part}: r=0 p50 {p['r0_p50_ms']:.2f} / p95 {p['r0_p95_ms']:.2f} ms; r=5% p50 {p['r5pct_p50_ms']:.2f} / "
            f"p95 {p['r5pct_p95_ms']:.2f} ms; ratio p50 {p['ratio_p50']:.3f}, p95 {p['ratio_p95']:.3f}, paired "
            f"{p['ratio_paired_median']:.3f}; {p['audits']} audits, {p['dropped']} dropped"
        )
    for name, figures in h["ledger_events_per_s"].items():
        print(f"ledger {name}: {figures}")
    r = h["report"]
    print(
        f"report of {r['events']} events: build_report {r['build_report_s']} s, one pass + render "
        f"{r['report_total_s']} s ({r['report_total_cpu_s']} CPU s; two passes {r['report_two_pass_s']} s)"
    )
    warn_if_loaded(m, "; the milliseconds carry their load.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run (under a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--parts", default="abcd", help="which parts to run (default abcd)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(1)  # servers and clients share this process and 2 cores
    run = Run(
        "verification",
        quick=args.quick,
        machine={**machine_info(**torch_stack()), "sqlalchemy": sqlalchemy.__version__, "psycopg": psycopg.__version__},
    )
    result = run.result
    result["plan"] = asdict(plan)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="corolla-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        if "a" in args.parts or "b" in args.parts:
            t0 = time.perf_counter()
            lab = Lab(init_tiny(workdir / "tiny-llama", TINY), stack)
            servers = [lab.server(span) for span in plan.spans for _ in range(plan.replicas)]
            timings["swarm_start_s"] = time.perf_counter() - t0
            if "a" in args.parts:
                result["generation"] = bench_generation(lab, servers, plan)
                print(f"(a) generation step ms: {json.dumps(result['generation']['step_ms'])}", flush=True)
            if "b" in args.parts:
                result["training"] = bench_training(lab, servers, plan)
                print(f"(b) training step ms: {json.dumps(result['training']['step_ms'])}", flush=True)
        stack.close()  # the servers stop before the ledger parts
        if "c" in args.parts:
            result["ledger"] = bench_ledger(plan, workdir)
        if "d" in args.parts:
            result["report"] = benchmark_report(plan.report_events, workdir=workdir)
            print(f"(d) report: {json.dumps(result['report'])}", flush=True)
    if set("abcd") <= set(args.parts):
        result["headline"] = headline(result)
    run.finish(args.out)
    if "headline" in result:
        print_summary(result)
    run.print_written()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
