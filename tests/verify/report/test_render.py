"""The renderers: HTML with SVG plots and everything escaped, Markdown, JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

import pytest

from corolla.verify.errors import LedgerTamperedError
from corolla.verify.ledger import AnyEvent, Ledger, LedgerKey
from corolla.verify.report import Report, build_report, render_html, render_json, render_markdown

from .scenario import T0, hostile_scenario, scenario, sha, write_ledger


def _report(tmp_path: Path, events: Sequence[AnyEvent], *, tampered: bool = False) -> Report:
    key = LedgerKey.generate()
    write_ledger(tmp_path / "ledger.db", events, key)
    with Ledger.open(str(tmp_path / "ledger.db")) as ledger:
        chain = LedgerTamperedError("event 4: event_hash does not match", seq=4) if tampered else None
        return build_report(ledger.events(), chain=chain or ledger.verify(key.public_key()), now=T0 + 100)


@pytest.fixture
def report(tmp_path: Path) -> Report:
    return _report(tmp_path, scenario())


@pytest.fixture
def hostile(tmp_path: Path) -> Report:
    return _report(tmp_path, hostile_scenario())


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs


def test_html_has_both_plots_and_the_evidence(report: Report) -> None:
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<svg") == 2  # reputation over time and audits per node, for the one model
    assert "<polyline" in page and "Reputation score over time" in page and "Audits per node" in page
    assert re.search(r'<rect [^>]*fill="#c62828"><title>node-x \[0:2\]: 2 failed</title>', page)
    assert "Chain verified" in page and f"{report.chain.head_hash}</span>" in page
    for h in (sha("in-4"), sha("primary-4"), sha("check-4"), sha("referee-4")):
        assert h in page
    assert "referee sided with the check" in page and "re-admitted at seq 8" in page
    assert "replaced the faulty GPU" in page


def test_html_is_self_contained(report: Report) -> None:
    tags = _Tags()
    tags.feed(render_html(report))
    assert "script" not in tags.tags and "link" not in tags.tags and "img" not in tags.tags
    urls = [v for k, v in tags.attrs if k in ("src", "href") and v]
    assert urls == []


def test_html_escapes_what_comes_from_the_network(hostile: Report) -> None:
    page = render_html(hostile)
    tags = _Tags()
    tags.feed(page)
    assert "script" not in tags.tags
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; [0:2]" in page  # the SVG labels too


def test_markdown_escapes_what_comes_from_the_network(hostile: Report) -> None:
    text = render_markdown(hostile)
    assert "<script" not in text and "&lt;script&gt;" in text
    assert "\\| \\`code\\` \\*bold\\* \\[link\\](http://x)" in text  # no table break, no markup
    for line in text.splitlines():
        if line.startswith("| "):
            assert line.count(" | ") - line.count("\\| ") in (3, 5, 6, 8, 9)  # cells as the header says


def test_markdown_has_the_tables_and_evidence(report: Report) -> None:
    text = render_markdown(report)
    assert "**Chain verified**" in text
    assert "| 10 | 8 | 6 | 1 | 1 | 1 | 1 | 5 | 0 |" in text
    assert re.search(r"\| node-x \| 0:2 \| 0\.\d{3} \| 1 \| 2 \| 0 \| 1 \|", text)
    assert f"input `{sha('in-4')}`" in text
    assert f"primary node-x (float32) output `{sha('primary-4')}`" in text
    assert "verdict **fail**; referee sided with the check; disagreeing: node-x" in text
    assert "### seq 5: node-x on tiny-llama-abc123 blocks 0:2" in text


def test_json_parses_and_matches_the_report(report: Report) -> None:
    data = json.loads(render_json(report))
    assert data["totals"]["audits"] == 8 and data["totals"]["failed"] == 1
    assert data["chain"]["state"] == "verified" and data["chain"]["head_seq"] == 10
    x = next(s for s in data["subjects"] if s["subject"]["node_id"] == "node-x")
    assert (x["audits_passed"], x["audits_failed"], x["blamed"], x["quarantined"]) == (1, 2, 1, False)
    assert x["history"][-1]["score"] == pytest.approx(x["score"])
    ev = data["quarantines"][0]["evidence"][0]
    assert ev["input_sha256"] == sha("in-4") and ev["referee"]["node_id"] == "node-b"
    assert ev["sided_with"] == "check" and ev["verdict"] == "fail"
    assert Report.model_validate(data) == report  # the JSON is the whole report


def test_a_tampered_chain_is_said_loudly_in_every_format(tmp_path: Path) -> None:
    report = _report(tmp_path, scenario(), tampered=True)
    assert 'class="banner tampered"' in render_html(report)
    assert "First bad event: seq 4" in render_html(report)
    assert "**WARNING: THE LEDGER DOES NOT VERIFY**" in render_markdown(report)
    assert "- first bad event: seq 4" in render_markdown(report)
    assert json.loads(render_json(report))["chain"]["first_bad_seq"] == 4


def test_an_empty_ledger_renders(tmp_path: Path) -> None:
    report = _report(tmp_path, [])
    assert report.totals.events == 0 and report.chain.state == "verified"
    assert "Corolla audit report" in render_html(report) and "None." in render_markdown(report)
    json.loads(render_json(report))
