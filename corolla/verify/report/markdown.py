"""The report as Markdown (GitHub-flavoured tables), for a ticket, a wiki or a terminal.

Node ids, model ids, event ids and reasons come from the network: they are HTML-escaped
(Markdown viewers render inline HTML) and their Markdown punctuation backslash-escaped,
so a hostile id can neither inject markup nor break a table.
"""

from __future__ import annotations

import html
import re

from corolla.verify.report import _format as f
from corolla.verify.report.model import EvidenceReport, QuarantineReport, Report

__all__ = ["render_markdown"]

# Inline markup only: untrusted text never starts a line here, so list and heading marks are inert.
_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
_SPACE = re.compile(r"\s+")


def _md(text: str) -> str:
    """Untrusted text as inert Markdown: one line, no HTML, no markup, no table breaks."""
    return _SPECIAL.sub(r"\\\1", html.escape(_SPACE.sub(" ", text), quote=False))


def _hash(hex_hash: str | None) -> str:
    return f"`{hex_hash}`" if hex_hash else "-"  # validated lowercase hex: safe in a code span


def render_markdown(report: Report) -> str:
    t = report.totals
    lines = [
        "# Corolla audit report",
        "",
        f"Generated {f.utc(report.generated_at)} from {t.events} ledger events"
        + (
            f" (up to seq {report.last_seq}, {f.utc(report.first_at)} to {f.utc(report.last_at)})." if t.events else "."
        ),
        "",
        "## Ledger chain",
        "",
        f"**{f.chain_headline(report.chain)}**: {_md(report.chain.message)}",
        "",
    ]
    if report.chain.state == "verified":
        lines += [f"- head seq {report.chain.head_seq}, head hash {_hash(report.chain.head_hash)}", ""]
    elif report.chain.state == "tampered":
        bad = report.chain.first_bad_seq
        lines += [
            f"- first bad event: {'seq ' + str(bad) if bad is not None else 'the signed head'}",
            "- every number below was read from a ledger that does not verify: do not rely on it",
            "",
        ]
    if report.unreadable_seqs:
        seqs = ", ".join(str(s) for s in report.unreadable_seqs)
        lines += [f"- rows whose body is not a valid event, left out of this report: seq {seqs}", ""]
    lines += [
        "## Summary",
        "",
        "| events | audits | passed | failed | inconclusive | quarantines | re-admissions | subjects "
        "| quarantined now |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {t.events} | {t.audits} | {t.passed} | {t.failed} | {t.inconclusive} | {t.quarantines} | {t.readmits} "
        f"| {t.subjects} | {t.quarantined_now} |",
        "",
    ]
    for model in report.models:
        lines += [
            f"## Reputation: model {_md(model)}",
            "",
            "| node | span | score | passed | failed | inconclusive | blamed | LLR | status | last event |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for s in report.subjects:
            if s.subject.model_id != model:
                continue
            status = f.status(s)
            lines.append(
                f"| {_md(s.subject.node_id)} | {f.span(s.subject)} | {f.score(s.score)} | {s.audits_passed} "
                f"| {s.audits_failed} | {s.audits_inconclusive} | {s.blamed} | {s.log_likelihood_ratio:.2f} "
                f"| {'**' + status + '**' if s.quarantined else _md(status)} | {f.utc(s.last_at)} |"
            )
        lines.append("")
    lines += ["## Quarantines", ""]
    if not report.quarantines:
        lines += ["None.", ""]
    for q in report.quarantines:
        lines += _quarantine(q)
    if report.unrecorded_decisions:
        lines += [
            "## Quarantines decided but not recorded",
            "",
            "Replaying the ledger, the reputation policy quarantines these subjects, but no quarantine event follows.",
            "",
            "| audit seq | node | model | span | LLR | reason |",
            "|---:|---|---|---|---:|---|",
        ]
        lines += [
            f"| {d.seq} | {_md(d.subject.node_id)} | {_md(d.subject.model_id)} | {f.span(d.subject)} "
            f"| {d.log_likelihood_ratio:.3f} | {_md(d.reason)} |"
            for d in report.unrecorded_decisions
        ]
        lines.append("")
    lines += ["## Re-admissions", ""]
    if not report.readmits:
        lines += ["None.", ""]
    else:
        lines += [
            "| seq | time | node | model | span | by | reason | was quarantined |",
            "|---:|---|---|---|---|---|---|---|",
        ]
        for r in report.readmits:
            lines.append(
                f"| {r.seq} | {f.utc(r.at)} | {_md(r.subject.node_id)} | {_md(r.subject.model_id)} "
                f"| {f.span(r.subject)} | {_md(r.reporter)} | {_md(r.reason)} "
                f"| {'yes' if r.was_quarantined else 'no'} |"
            )
        lines.append("")
    lines += ["## Reputation policy", ""]
    lines += [f"- {_md(k)}: {_md(str(v))}" for k, v in report.policy.items()] or ["(default)"]
    lines.append("")
    return "\n".join(lines)


def _quarantine(q: QuarantineReport) -> list[str]:
    s = q.subject
    ended = f.quarantine_end(q)
    lines = [
        f"### seq {q.seq}: {_md(s.node_id)} on {_md(s.model_id)} blocks {f.span(s)}",
        "",
        f"- at {f.utc(q.at)} by {_md(q.reporter)}; {ended}",
        f"- log-likelihood ratio {q.log_likelihood_ratio:.3f}; reason: {_md(q.reason)}",
        f"- evidence: {len(q.evidence)} audit(s)"
        + (f"; NOT IN THE LEDGER: {', '.join(_md(e) for e in q.missing_evidence)}" if q.missing_evidence else ""),
        "",
    ]
    for e in q.evidence:
        lines += _evidence(e)
    lines.append("")
    return lines


def _evidence(e: EvidenceReport) -> list[str]:
    wrong = ", ".join(_md(n) for n in e.disagreeing) or "-"
    c = e.comparison
    lines = [
        f"- **seq {e.seq}** audit {_md(e.event_id)}: {e.work.value} at {f.utc(e.at)} by {_md(e.reporter)}; "
        f"verdict **{e.verdict.value}**; {f.referee_text(e)}; disagreeing: {wrong}",
        f"  - input {_hash(e.input_sha256)}",
        f"  - primary {_md(e.primary.node_id)} ({_md(e.primary.precision)}) output {_hash(e.primary.output_sha256)}",
        f"  - check {_md(e.check.node_id)} ({_md(e.check.precision)}) output {_hash(e.check.output_sha256)}: "
        f"rel L2 {c.rel_l2:.3g} (tolerance {e.tolerance_rel_l2:.3g}), max abs {c.max_abs:.3g} "
        f"(tolerance {e.tolerance_max_abs:.3g}), {f.agree(c.agree)}",
    ]
    if e.referee is not None:
        vp, vc = e.referee_vs_primary, e.referee_vs_check
        lines.append(
            f"  - referee {_md(e.referee.node_id)} ({_md(e.referee.precision)}) output "
            f"{_hash(e.referee.output_sha256)}: vs primary {f.agree(vp.agree if vp else None)}"
            + (f" (rel L2 {vp.rel_l2:.3g})" if vp else "")
            + f", vs check {f.agree(vc.agree if vc else None)}"
            + (f" (rel L2 {vc.rel_l2:.3g})" if vc else "")
        )
    if e.blamed is not None:
        lines.append(f"  - blamed: {_md(e.blamed.node_id)} blocks {f.span(e.blamed)}")
    return lines
