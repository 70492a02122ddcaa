"""The report as one self-contained HTML page: inline CSS and SVG plots, no scripts, no
external resources. Every string from the ledger goes through `html.escape`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

from corolla.verify.report import _format as f
from corolla.verify.report.model import EvidenceReport, QuarantineReport, Report, SubjectReport
from corolla.verify.report.svg import Bar, Mark, Series, line_chart, stacked_bars

__all__ = ["MAX_BARS", "MAX_LINES", "MAX_MARKS", "render_html"]

MAX_LINES = 20  # subjects drawn per reputation plot (quarantined and lowest scores first)
MAX_BARS = 60  # subjects drawn per audits plot (quarantined and most failures first)
MAX_MARKS = 200  # quarantines and re-admissions marked per plot (the latest)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f5f5f5} td.n{text-align:right;font-variant-numeric:tabular-nums}
code,.h{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.banner{padding:.8em 1em;border-radius:4px;margin:1em 0;font-size:15px}
.verified{background:#e8f5e9;border:1px solid #2e7d32}
.tampered{background:#c62828;color:#fff;font-size:20px;font-weight:bold}
.unchecked{background:#fff8e1;border:1px solid #f9a825}
tr.q td{background:#ffebee} .flag{color:#c62828;font-weight:bold}
.quarantine{border:1px solid #e0b4b4;border-radius:4px;padding:.2em 1em 1em;margin:1em 0}
.evidence{border-left:3px solid #bbb;margin:.8em 0;padding-left:.8em}
.muted{color:#666} svg.plot{display:block;margin:1em 0;max-width:100%;height:auto}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _td(value: object, *, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("n" if num else "", cls) if c)
    return f'<td class="{classes}">{_e(value)}</td>' if classes else f"<td>{_e(value)}</td>"


def _row(cells: Iterable[str], *, cls: str = "") -> str:
    return (f'<tr class="{cls}">' if cls else "<tr>") + "".join(cells) + "</tr>"


def _head(*names: str) -> str:
    return "<tr>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"


def render_html(report: Report) -> str:
    t = report.totals
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # No scripts and no network: the page is evidence, so it must render the same anywhere.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        "<title>Corolla audit report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Corolla audit report</h1>",
        f'<p class="muted">Generated {_e(f.utc(report.generated_at))} from {t.events} ledger events'
        + (
            f" (up to seq {report.last_seq}, {_e(f.utc(report.first_at))} to {_e(f.utc(report.last_at))})"
            if t.events
            else ""
        )
        + ".</p>",
    ]
    out += _chain(report)
    out += [
        "<h2>Summary</h2><table>",
        _head(
            "events",
            "audits",
            "passed",
            "failed",
            "inconclusive",
            "quarantines",
            "re-admissions",
            "subjects",
            "quarantined now",
        ),
        _row(
            _td(v, num=True)
            for v in (
                t.events,
                t.audits,
                t.passed,
                t.failed,
                t.inconclusive,
                t.quarantines,
                t.readmits,
                t.subjects,
                t.quarantined_now,
            )
        ),
        "</table>",
    ]
    for model in report.models:
        subjects = [s for s in report.subjects if s.subject.model_id == model]
        out += _model(model, subjects, _marks(report, model))
    out.append("<h2>Quarantines</h2>")
    if not report.quarantines:
        out.append("<p>None.</p>")
    for q in report.quarantines:
        out += _quarantine(q)
    if report.unrecorded_decisions:
        out += [
            "<h2>Quarantines decided but not recorded</h2>",
            "<p>Replaying the ledger, the reputation policy quarantines these subjects, but no quarantine "
            "event follows in the ledger.</p><table>",
            _head("audit seq", "node", "model", "span", "LLR", "reason", "evidence"),
        ]
        for d in report.unrecorded_decisions:
            out.append(
                _row(
                    [
                        _td(d.seq, num=True),
                        _td(d.subject.node_id),
                        _td(d.subject.model_id),
                        _td(f.span(d.subject)),
                        _td(f"{d.log_likelihood_ratio:.3f}", num=True),
                        _td(d.reason),
                        _td(", ".join(d.evidence), cls="h"),
                    ]
                )
            )
        out.append("</table>")
    out.append("<h2>Re-admissions</h2>")
    if not report.readmits:
        out.append("<p>None.</p>")
    else:
        out += ["<table>", _head("seq", "time", "node", "model", "span", "by", "reason", "was quarantined")]
        for r in report.readmits:
            out.append(
                _row(
                    [
                        _td(r.seq, num=True),
                        _td(f.utc(r.at)),
                        _td(r.subject.node_id),
                        _td(r.subject.model_id),
                        _td(f.span(r.subject)),
                        _td(r.reporter),
                        _td(r.reason),
                        _td("yes" if r.was_quarantined else "no (was not quarantined)"),
                    ]
                )
            )
        out.append("</table>")
    out += ["<h2>Reputation policy</h2><table>", _head("setting", "value")]
    out += [_row([_td(k), _td(v)]) for k, v in report.policy.items()]
    out += ["</table>", "</body></html>", ""]
    return "\n".join(out)


def _chain(report: Report) -> list[str]:
    c = report.chain
    lines = ["<h2>Ledger chain</h2>", f'<div class="banner {_e(c.state)}">{_e(f.chain_headline(c))}: {_e(c.message)}']
    if c.state == "tampered":
        where = f"seq {c.first_bad_seq}" if c.first_bad_seq is not None else "the signed head"
        lines.append(
            f"<br>First bad event: {_e(where)}. Every number below was read from a ledger that does not verify."
        )
    if report.unreadable_seqs:
        seqs = ", ".join(str(s) for s in report.unreadable_seqs)
        lines.append(f"<br>Rows whose body is not a valid event, left out of this report: seq {_e(seqs)}.")
    lines.append("</div>")
    if c.state == "verified":
        lines.append(f'<p>Head seq {c.head_seq}, head hash <span class="h">{_e(c.head_hash)}</span></p>')
    return lines


def _label(s: SubjectReport) -> str:
    return f"{s.subject.node_id} [{f.span(s.subject)}]"


def _marks(report: Report, model: str) -> list[Mark]:
    marks = [
        Mark(at=q.at, kind="quarantine", label=f"quarantine of {q.subject.node_id} [{f.span(q.subject)}] (seq {q.seq})")
        for q in report.quarantines
        if q.subject.model_id == model
    ] + [
        Mark(at=r.at, kind="readmit", label=f"re-admission of {r.subject.node_id} [{f.span(r.subject)}] (seq {r.seq})")
        for r in report.readmits
        if r.subject.model_id == model
    ]
    return sorted(marks, key=lambda m: m.at)


def _model(model: str, subjects: list[SubjectReport], marks: list[Mark]) -> list[str]:
    lines = [f"<h2>Reputation: model {_e(model)}</h2>"]
    by_concern = sorted(subjects, key=lambda s: (not s.quarantined, s.score))
    drawn = by_concern[:MAX_LINES]
    lines.append(
        line_chart(
            [
                Series(label=_label(s), points=[(p.at, p.score) for p in s.history], alert=s.quarantined)
                for s in sorted(drawn, key=lambda s: (s.subject.start, s.subject.end, s.subject.node_id))
            ],
            title=f"Reputation score over time: {model}",
            marks=marks[-MAX_MARKS:],
        )
    )
    if len(subjects) > len(drawn):
        lines.append(
            f'<p class="muted">{len(subjects) - len(drawn)} more subjects not drawn (the plot shows the '
            f"{len(drawn)} quarantined or lowest-scoring); the table lists all.</p>"
        )
    most_failed = sorted(subjects, key=lambda s: (not s.quarantined, -s.audits_failed, -s.audits))[:MAX_BARS]
    lines.append(
        stacked_bars(
            [
                Bar(
                    label=_label(s),
                    passed=s.audits_passed,
                    failed=s.audits_failed,
                    inconclusive=s.audits_inconclusive,
                    alert=s.quarantined,
                )
                for s in sorted(most_failed, key=lambda s: (s.subject.start, s.subject.end, s.subject.node_id))
            ],
            title=f"Audits per node: {model}",
        )
    )
    if len(subjects) > len(most_failed):
        lines.append(f'<p class="muted">{len(subjects) - len(most_failed)} more subjects not drawn.</p>')
    lines += [
        "<table>",
        _head("node", "span", "score", "passed", "failed", "inconclusive", "blamed", "LLR", "status", "last event"),
    ]
    for s in subjects:
        lines.append(
            _row(
                [
                    _td(s.subject.node_id, cls="h"),
                    _td(f.span(s.subject)),
                    _td(f.score(s.score), num=True),
                    _td(s.audits_passed, num=True),
                    _td(s.audits_failed, num=True),
                    _td(s.audits_inconclusive, num=True),
                    _td(s.blamed, num=True),
                    _td(f"{s.log_likelihood_ratio:.2f}", num=True),
                    _td(f.status(s), cls="flag" if s.quarantined else ""),
                    _td(f.utc(s.last_at)),
                ],
                cls="q" if s.quarantined else "",
            )
        )
    lines.append("</table>")
    return lines


def _quarantine(q: QuarantineReport) -> list[str]:
    s = q.subject
    ended = f.quarantine_end(q)
    lines = [
        '<div class="quarantine">',
        f"<h3>seq {q.seq}: <code>{_e(s.node_id)}</code> on {_e(s.model_id)} blocks {_e(f.span(s))}</h3>",
        f"<p>At {_e(f.utc(q.at))} by <code>{_e(q.reporter)}</code>; {_e(ended)}. "
        f"Log-likelihood ratio {q.log_likelihood_ratio:.3f}.<br>Reason: {_e(q.reason)}</p>",
        f"<p>Evidence: {len(q.evidence)} audit(s).</p>",
    ]
    if q.missing_evidence:
        lines.append(
            '<p class="flag">Cited but not found in the ledger as failed or disputed audits: '
            + ", ".join(f"<code>{_e(e)}</code>" for e in q.missing_evidence)
            + "</p>"
        )
    for e in q.evidence:
        lines += _evidence(e)
    lines.append("</div>")
    return lines


def _evidence(e: EvidenceReport) -> list[str]:
    c = e.comparison
    lines = [
        '<div class="evidence">',
        f"<p><b>seq {e.seq}</b> audit <code>{_e(e.event_id)}</code>: {_e(e.work.value)} at {_e(f.utc(e.at))} "
        f"by <code>{_e(e.reporter)}</code>. Verdict <b>{_e(e.verdict.value)}</b>; {_e(f.referee_text(e))}; "
        f"disagreeing: {', '.join(f'<code>{_e(n)}</code>' for n in e.disagreeing) or '-'}.</p>",
        f'<p>Input <span class="h">{_e(e.input_sha256)}</span></p>',
        "<table>",
        _head("run", "node", "precision", "output sha256"),
    ]
    runs = [("primary", e.primary), ("check", e.check)] + ([("referee", e.referee)] if e.referee else [])
    for role, run in runs:
        lines.append(_row([_td(role), _td(run.node_id, cls="h"), _td(run.precision), _td(run.output_sha256, cls="h")]))
    lines += ["</table><table>", _head("comparison", "rel L2", "max abs", "result")]
    lines.append(
        _row(
            [
                _td("primary vs check"),
                _td(f"{c.rel_l2:.3g}", num=True),
                _td(f"{c.max_abs:.3g}", num=True),
                _td(f.agree(c.agree)),
            ]
        )
    )
    for name, cmp in (("referee vs primary", e.referee_vs_primary), ("referee vs check", e.referee_vs_check)):
        if cmp is not None:
            lines.append(
                _row(
                    [
                        _td(name),
                        _td(f"{cmp.rel_l2:.3g}", num=True),
                        _td(f"{cmp.max_abs:.3g}", num=True),
                        _td(f.agree(cmp.agree)),
                    ]
                )
            )
    lines.append(
        _row(
            [
                _td("tolerance"),
                _td(f"{e.tolerance_rel_l2:.3g}", num=True),
                _td(f"{e.tolerance_max_abs:.3g}", num=True),
                _td(""),
            ]
        )
    )
    lines.append("</table>")
    if e.blamed is not None:
        lines.append(f"<p>Blamed: <code>{_e(e.blamed.node_id)}</code> blocks {_e(f.span(e.blamed))}</p>")
    lines.append("</div>")
    return lines
