"""Test and benchmark data: synthetic ledger events, not a part of verification itself.

`synthetic_events(n)` builds a deterministic stream of honest servers, one that corrupts a
fraction of its outputs, the quarantines the reputation policy decides, and re-admissions;
`append_synthetic_events(ledger, n)` writes one to a ledger; `benchmark_report(n)` times a
report of such a ledger (`benchmarks/verification.py`, `tests/verify/report/`).

The stream is what a coordinator would write: each audit is fed to a `ReputationBook`, every
decision it returns is followed by a `QuarantineEvent`, and a quarantined node is left out
of routing (neither primary nor check) until a `ReadmitEvent` lets it back.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from corolla.verify.events import AuditEvent, Comparison, QuarantineEvent, ReadmitEvent, Run, Subject, Verdict, Work
from corolla.verify.reputation import ReputationBook

if TYPE_CHECKING:
    from corolla.verify.ledger import Ledger

__all__ = ["append_synthetic_events", "benchmark_report", "synthetic_events"]

AnyEvent = AuditEvent | QuarantineEvent | ReadmitEvent
_T = TypeVar("_T")
_AGREE = Comparison(rel_l2=1e-4, max_abs=2e-3, agree=True)
_DISAGREE = Comparison(rel_l2=0.4, max_abs=3.5, agree=False)


def _sha(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def synthetic_events(
    n_events: int,
    *,
    seed: int = 0,
    model_id: str = "synthetic-model",
    spans: tuple[tuple[int, int], ...] = ((0, 4), (4, 8)),
    honest_per_span: int = 4,
    bad_node: str = "bad-0",
    bad_fraction: float = 0.02,  # fraction of the bad node's outputs that are corrupted
    inconclusive_fraction: float = 0.01,  # disagreements with no referee available
    readmit_after: int = 2_000,  # events a quarantine lasts before an operator re-admits
    start_at: float = 1_750_000_000.0,
    step: float = 0.5,  # seconds between events
) -> Iterator[AnyEvent]:
    """Exactly `n_events` events (audits, quarantines, re-admissions), deterministic in `seed`."""
    rng = random.Random(seed)
    book = ReputationBook()
    nodes = {span: [f"node-{span[0]}-{i}" for i in range(honest_per_span)] for span in spans}
    nodes[spans[0]].append(bad_node)
    bad = Subject(node_id=bad_node, model_id=model_id, start=spans[0][0], end=spans[0][1])
    quarantined_since: int | None = None
    emitted = 0

    def run(node: str, wrong: bool, i: int) -> Run:
        return Run(node_id=node, precision="bfloat16", output_sha256=_sha("out", i, node if wrong else "ok"))

    while emitted < n_events:
        at = start_at + emitted * step
        if quarantined_since is not None and emitted - quarantined_since >= readmit_after:
            readmit = ReadmitEvent(
                event_id=f"r{seed}-{emitted:08d}", at=at, reporter="operator", subject=bad, reason="fixed its GPU"
            )
            book.observe(readmit)
            yield readmit
            quarantined_since = None
            emitted += 1
            continue
        span = spans[rng.randrange(len(spans))]
        pool = [n for n in nodes[span] if not (n == bad_node and quarantined_since is not None)]
        primary, check = rng.sample(pool, 2)
        referee = rng.choice([n for n in pool if n not in (primary, check, bad_node)])
        primary_wrong = primary == bad_node and rng.random() < bad_fraction
        check_wrong = check == bad_node and rng.random() < bad_fraction
        subject = Subject(node_id=primary, model_id=model_id, start=span[0], end=span[1])
        fields: dict[str, object] = {}
        if primary_wrong or check_wrong:
            right_side = "check" if primary_wrong else "primary"
            fields = {
                "referee": run(referee, False, emitted),
                "referee_vs_primary": _AGREE if right_side == "primary" else _DISAGREE,
                "referee_vs_check": _AGREE if right_side == "check" else _DISAGREE,
                "verdict": Verdict.FAIL if primary_wrong else Verdict.PASS,
                "blamed": bad if check_wrong else None,
            }
        elif rng.random() < inconclusive_fraction:
            fields = {"verdict": Verdict.INCONCLUSIVE}  # a disagreement no referee could settle
        else:
            fields = {"verdict": Verdict.PASS}
        agree = fields["verdict"] is Verdict.PASS and fields.get("blamed") is None
        audit = AuditEvent.model_validate(
            {
                "event_id": f"a{seed}-{emitted:08d}",
                "at": at,
                "reporter": f"site-{rng.randrange(3)}",
                "subject": subject,
                "work": Work.INFERENCE if rng.random() < 0.8 else Work.FORWARD,
                "input_sha256": _sha("in", emitted),
                "primary": run(primary, primary_wrong, emitted),
                "check": run(check, check_wrong, emitted),
                "comparison": _AGREE if agree else _DISAGREE,
                "tolerance_rel_l2": 0.02,
                "tolerance_max_abs": 0.25,
                **fields,
            }
        )
        yield audit
        emitted += 1
        for decision in book.observe_all(audit):
            if emitted >= n_events:
                break
            quarantine = decision.event(
                event_id=f"q{seed}-{emitted:08d}", at=start_at + emitted * step, reporter="coordinator"
            )
            book.observe(quarantine)
            yield quarantine
            emitted += 1
            if decision.subject == bad:
                quarantined_since = emitted


def append_synthetic_events(ledger: Ledger, n_events: int, *, seed: int = 0, batch_size: int = 5_000) -> None:
    """Append `synthetic_events(n_events, seed=seed)` to `ledger`, `batch_size` per transaction."""
    batch: list[AnyEvent] = []
    for event in synthetic_events(n_events, seed=seed):
        batch.append(event)
        if len(batch) == batch_size:
            ledger.append(batch)
            batch = []
    ledger.append(batch)


def benchmark_report(n_events: int, *, seed: int = 0, workdir: Path | None = None) -> dict[str, float | int]:
    """Time a report of `n_events` synthetic events from a real SQLite ledger: writing the
    ledger (not part of the report), reading it back, checking the chain, building the report
    from those (`verify` then `build_report(ledger.events())`: two reads), building it in one
    pass as `platform audit report` does (`ledger_report`), and rendering it in each format.
    Wall-clock seconds (`*_s`) and this process's CPU seconds (`*_cpu_s`, steadier on a shared
    machine), plus sizes for context. `report_total` is what the command spends: the one pass
    and the HTML."""
    from corolla.verify.ledger import Ledger, LedgerKey
    from corolla.verify.report import Report, build_report, ledger_report, render_html, render_json, render_markdown

    out: dict[str, float | int] = {}

    def timed(name: str, fn: Callable[[], _T]) -> _T:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        out[f"{name}_s"] = round(time.perf_counter() - wall, 3)
        out[f"{name}_cpu_s"] = round(time.process_time() - cpu, 3)
        return result

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        key = LedgerKey.generate()
        with Ledger.open(str(Path(tmp) / "ledger.db"), key=key, writer="benchmark") as ledger:
            timed("write_ledger", lambda: append_synthetic_events(ledger, n_events, seed=seed))
            read = timed("read_events", lambda: sum(1 for _ in ledger.events()))  # reading and parsing alone
            chain = timed("verify", lambda: ledger.verify(key.public_key()))
            timed("build_report", lambda: build_report(ledger.events(), chain=chain))
            report: Report = timed("ledger_report", lambda: ledger_report(ledger, key.public_key()))
        html = timed("render_html", lambda: render_html(report))
        js = timed("render_json", lambda: render_json(report))
        md = timed("render_markdown", lambda: render_markdown(report))
    for unit in ("s", "cpu_s"):  # what `platform audit report` costs: one pass (read, check, replay), render
        out[f"report_total_{unit}"] = round(out[f"ledger_report_{unit}"] + out[f"render_html_{unit}"], 3)
        out[f"report_two_pass_{unit}"] = round(  # verify, then read again: the command before `Ledger.scan`
            out[f"verify_{unit}"] + out[f"build_report_{unit}"] + out[f"render_html_{unit}"], 3
        )
    return {
        "n_events": read,
        **out,
        "html_bytes": len(html.encode()),
        "json_bytes": len(js.encode()),
        "markdown_bytes": len(md.encode()),
        "subjects": report.totals.subjects,
        "quarantines": report.totals.quarantines,
        "readmits": report.totals.readmits,
    }
