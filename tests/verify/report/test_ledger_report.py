"""`ledger_report` (one pass: `Ledger.scan`) gives the report the two passes gave (`verify`,
then `events` again, then `build_report`), on clean and tampered real SQLite ledgers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from corolla.verify.errors import LedgerError
from corolla.verify.ledger import AnyEvent, Ledger, LedgerKey, LedgerPublicKey
from corolla.verify.report import Report, build_report, ledger_report, render_html, render_json, render_markdown
from corolla.verify.report.synthetic import synthetic_events
from tests.verify.ledger.conftest import raw_sql
from tests.verify.ledger.two_pass import two_pass

from .scenario import T0, scenario, write_ledger

NOW = T0 + 100

TAMPERING = {
    "clean": (),
    "an edited column": ("UPDATE ledger_events SET written_at = written_at + 1 WHERE seq = 4",),
    "a body that is no event": ("""UPDATE ledger_events SET body = '{"kind": "nonsense"}' WHERE seq = 6""",),
    "an edited body": ("""UPDATE ledger_events SET body = replace(body, '"node-b"', '"node-z"') WHERE seq = 2""",),
    "a deleted quarantine": ("DELETE FROM ledger_events WHERE seq = 5",),
    "a deleted last row": ("DELETE FROM ledger_events WHERE seq = 10",),
    "an edited head": ("UPDATE ledger_head SET signature = '00' || substr(signature, 3)",),
    "no head": ("DELETE FROM ledger_head",),
}


def _two_pass_report(ledger: Ledger, public_key: LedgerPublicKey | None, **kwargs: object) -> Report:
    """What `platform audit report` built before `ledger_report`."""
    reading = two_pass(ledger, public_key)
    report = build_report(reading.events, chain=reading.chain, now=NOW, **kwargs)  # type: ignore[arg-type]
    if reading.unreadable:
        report = report.model_copy(update={"unreadable_seqs": reading.unreadable})
    return report


def _assert_identical(one: Report, two: Report) -> None:
    assert one == two
    for render in (render_json, render_markdown, render_html):
        assert render(one) == render(two)


def _ledger(tmp_path: Path, events: Sequence[AnyEvent], *statements: str) -> tuple[str, LedgerKey]:
    key = LedgerKey.generate()
    path = tmp_path / "ledger.db"
    write_ledger(path, events, key)
    if statements:
        raw_sql(str(path), *statements)
    return str(path), key


@pytest.mark.parametrize("case", TAMPERING, ids=list(TAMPERING))
def test_one_pass_gives_the_two_pass_report(tmp_path: Path, case: str) -> None:
    url, key = _ledger(tmp_path, scenario(), *TAMPERING[case])
    with Ledger.open(url) as ledger:
        one = ledger_report(ledger, key.public_key(), now=NOW)
        _assert_identical(one, _two_pass_report(ledger, key.public_key()))
    assert (one.chain.state == "verified") == (case == "clean")
    assert one.chain.state in ("verified", "tampered")


def test_without_a_key_and_with_the_wrong_key(tmp_path: Path) -> None:
    url, _ = _ledger(tmp_path, scenario(), TAMPERING["a body that is no event"][0])
    other = LedgerKey.generate().public_key()
    with Ledger.open(url) as ledger:
        unchecked = ledger_report(ledger, None, now=NOW)
        _assert_identical(unchecked, _two_pass_report(ledger, None))
        assert unchecked.chain.state == "unchecked" and unchecked.unreadable_seqs == [6]
        wrong = ledger_report(ledger, other, now=NOW)
        _assert_identical(wrong, _two_pass_report(ledger, other))
        assert wrong.chain.state == "tampered" and wrong.chain.first_bad_seq is None


@pytest.mark.parametrize(
    "statements",
    [(), ("""UPDATE ledger_events SET body = 'nonsense' WHERE seq IN (1500, 2600)""",)],
    ids=["clean", "unreadable rows on two pages"],
)
def test_a_ledger_of_several_pages(tmp_path: Path, statements: tuple[str, ...]) -> None:
    url, key = _ledger(tmp_path, list(synthetic_events(3_000, seed=5)), *statements)
    with Ledger.open(url) as ledger:
        calls: tuple[list[int], list[int]] = ([], [])
        one = ledger_report(ledger, key.public_key(), now=NOW, progress=calls[0].append, progress_every=500)
        two = _two_pass_report(ledger, key.public_key(), progress=calls[1].append, progress_every=500)
    _assert_identical(one, two)
    assert calls[0] == calls[1] == list(range(500, one.totals.events + 1, 500))
    assert one.totals.events == 3_000 - len(one.unreadable_seqs)
    assert one.unreadable_seqs == ([1500, 2600] if statements else [])
    assert one.chain.first_bad_seq == (1500 if statements else None)


def test_the_outcome_is_known_only_after_the_last_event(tmp_path: Path) -> None:
    url, key = _ledger(tmp_path, scenario())
    with Ledger.open(url) as ledger:
        scan = ledger.scan(key.public_key(), batch=3)
        next(scan)
        with pytest.raises(LedgerError, match="has not read the whole ledger"):
            _ = scan.chain
        scan.close()  # stopping early releases the snapshot
        with pytest.raises(StopIteration):
            next(scan)
        with pytest.raises(LedgerError, match="batch must be >= 1"):
            ledger.scan(None, batch=0)
