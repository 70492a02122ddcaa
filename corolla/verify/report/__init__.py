"""Audit reports: what the ledger says about every server, rebuilt from its events.

`build_report(ledger.events(), chain=ledger.verify(public_key))` replays the ledger once
through the reputation policy; `render_html` (with SVG plots), `render_markdown` and
`render_json` write it out. `platform audit report` is the command-line door.
"""

from corolla.verify.report.build import build_report, chain_status
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
    "render_html",
    "render_json",
    "render_markdown",
]
