"""Audit reports: what the ledger says about every server, rebuilt from its events.

`ledger_report(ledger, public_key)` reads the ledger once, checking its chain as it goes,
and replays the events through the reputation policy (`build_report(events, chain=...)`
does the replay from events and a `verify` outcome at hand); `render_html` (with SVG
plots), `render_markdown` and `render_json` write it out. `platform audit report` is the
command-line door.

`corolla.verify.report.synthetic` (public, not imported here) builds synthetic ledgers for
tests and benchmarks.
"""

from corolla.verify.report.build import build_report, chain_status, ledger_report
from corolla.verify.report.html import render_html
from corolla.verify.report.markdown import render_markdown
from corolla.verify.report.model import (
    ChainStatus,
    EvidenceReport,
    PolicyDecision,
    QuarantineReport,
    ReadmitReport,
    Report,
    ScorePoint,
    SubjectReport,
    Totals,
    render_json,
)

__all__ = [
    "ChainStatus",
    "EvidenceReport",
    "PolicyDecision",
    "QuarantineReport",
    "ReadmitReport",
    "Report",
    "ScorePoint",
    "SubjectReport",
    "Totals",
    "build_report",
    "chain_status",
    "ledger_report",
    "render_html",
    "render_json",
    "render_markdown",
]
