"""`platform audit report/verify/readmit` and the reputation column of `swarm status`,
through the CLI entry point, on a real SQLite ledger in the workspace."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
import types
from pathlib import Path

import pytest

from corolla.inference.discovery import ServerRecord
from corolla.platform.cli import main
from corolla.platform.commands.audit import open_existing_ledger
from corolla.platform.commands.swarm import format_status, ledger_reputation
from corolla.verify.errors import LedgerError
from corolla.verify.events import Verdict
from corolla.verify.ledger import AnyEvent, Ledger, LedgerKey
from corolla.verify.ledger_paths import default_ledger_key_path, default_ledger_path, default_ledger_url
from corolla.verify.report import build, build_report, chain_status, render_html, render_json, render_markdown
from tests.verify.ledger.two_pass import two_pass
from tests.verify.report.scenario import MODEL, X, audit, quarantine, scenario, subj, write_ledger


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace whose ledger holds the hand-counted scenario (X quarantined, then re-admitted)."""
    ws = tmp_path / "ws"
    key = LedgerKey.load_or_create(default_ledger_key_path(ws))
    write_ledger(default_ledger_path(ws), scenario(), key)
    return ws


def _tamper(ws: Path, seq: int) -> None:
    """Edit an event's body behind the ledger's back (dropping the append-only trigger first)."""
    db = sqlite3.connect(default_ledger_path(ws))
    with db:
        db.execute("DROP TRIGGER ledger_events_no_update")
        db.execute("UPDATE ledger_events SET body = replace(body, '\"site-0\"', '\"site-9\"') WHERE seq = ?", (seq,))
    db.close()


def test_verify_ok(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", "--workspace", str(workspace)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 10 events, head 10 ")
    assert len(out.split()[-1]) == 64


def test_verify_names_the_first_tampered_event(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tamper(workspace, 4)
    assert main(["audit", "verify", "--workspace", str(workspace)]) == 14
    err = capsys.readouterr().err
    assert "event 4" in err and "does not match" in err


def test_verify_with_a_public_key_file(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = LedgerKey.load_or_create(default_ledger_key_path(workspace))
    (tmp_path / "ledger.pub").write_bytes(key.public_key().to_pem())
    (tmp_path / "other.pub").write_bytes(LedgerKey.generate().public_key().to_pem())
    url = default_ledger_url(workspace)
    other_ws = str(tmp_path / "elsewhere")  # no ledger key there: the key comes from the file only
    assert (
        main(
            ["audit", "verify", "--workspace", other_ws, "--ledger", url, "--public-key", str(tmp_path / "ledger.pub")]
        )
        == 0
    )
    assert "ok: 10 events" in capsys.readouterr().out
    assert (
        main(["audit", "verify", "--workspace", other_ws, "--ledger", url, "--public-key", str(tmp_path / "other.pub")])
        == 14
    )
    assert "not the key given" in capsys.readouterr().err
    assert main(["audit", "verify", "--workspace", other_ws, "--ledger", url]) == 13
    assert "--public-key" in capsys.readouterr().err


def test_a_missing_ledger_is_a_clear_error_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "empty"
    assert main(["audit", "report", "--workspace", str(ws)]) == 13
    assert "no ledger at" in capsys.readouterr().err
    assert not default_ledger_path(ws).exists()


@pytest.mark.parametrize(
    ("suffix", "marker"), [("html", "<!DOCTYPE html>"), ("json", '"totals"'), ("md", "# Corolla audit report")]
)
def test_report_to_out_in_each_format(
    workspace: Path, tmp_path: Path, suffix: str, marker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"report.{suffix}"
    assert main(["audit", "report", "--workspace", str(workspace), "--out", str(out)]) == 0
    text = out.read_text()
    assert marker in text
    said = capsys.readouterr().out
    assert f"wrote the {suffix} audit report to {out}" in said and "chain verified" in said
    if suffix == "json":
        data = json.loads(text)
        assert data["totals"]["events"] == 10 and data["chain"]["state"] == "verified"


def test_report_format_flag_default_path_and_stdout(
    workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.txt"
    assert main(["audit", "report", "--workspace", str(workspace), "--out", str(out), "--format", "md"]) == 0
    assert out.read_text().startswith("# Corolla audit report")
    assert main(["audit", "report", "--workspace", str(workspace)]) == 0
    (written,) = (workspace / "reports").glob("audit-*.html")
    assert str(written) in capsys.readouterr().out
    assert main(["audit", "report", "--workspace", str(workspace), "--out", "-", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["totals"]["audits"] == 8
    assert "wrote the json audit report to stdout" in captured.err


def test_report_of_a_tampered_ledger_renders_and_says_so(
    workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tamper(workspace, 4)
    out = tmp_path / "report.html"
    assert main(["audit", "report", "--workspace", str(workspace), "--out", str(out)]) == 14
    page = out.read_text()
    assert "WARNING: THE LEDGER DOES NOT VERIFY" in page and "First bad event: seq 4" in page
    assert "DOES NOT VERIFY" in capsys.readouterr().err


def test_report_without_a_key_is_unchecked(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    default_ledger_key_path(workspace).unlink()
    out = tmp_path / "r.json"
    assert main(["audit", "report", "--workspace", str(workspace), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["chain"]["state"] == "unchecked"
    assert "no public key" in capsys.readouterr().err


def test_readmit_writes_a_readmit_event(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    key = LedgerKey.load_or_create(default_ledger_key_path(ws))
    write_ledger(default_ledger_path(ws), scenario(with_readmit=False), key)  # X stays quarantined
    args = ["audit", "readmit", "node-x", "--workspace", str(ws), "--model-id", MODEL, "--reason", "new GPU"]
    assert main([*args, "--blocks", "2:4"]) == 13  # not quarantined for that span
    assert f"it is quarantined for: {MODEL} 0:2" in capsys.readouterr().err
    assert main([*args, "--blocks", "0:2"]) == 0
    assert "re-admitted node-x" in capsys.readouterr().out
    with Ledger.open(str(default_ledger_path(ws))) as ledger:
        last = list(ledger.events())[-1]
        assert ledger.verify(key.public_key()).head_seq == last.seq == 8
    assert last.event.kind == "readmit" and last.event.subject == X and last.event.reason == "new GPU"
    assert abs(last.event.at - time.time()) < 60
    assert main([*args, "--blocks", "0:2"]) == 13  # no longer quarantined
    assert "not quarantined anywhere" in capsys.readouterr().err


def test_readmit_needs_the_ledger_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    key_path = default_ledger_key_path(ws)
    write_ledger(default_ledger_path(ws), scenario(with_readmit=False), LedgerKey.load_or_create(key_path))
    key_path.unlink()
    code = main(
        ["audit", "readmit", "node-x", "--workspace", str(ws), "--model-id", MODEL, "--blocks", "0:2", "--reason", "r"]
    )
    assert code == 13 and "--key" in capsys.readouterr().err


def test_readmit_without_a_model_id_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", "readmit", "node-x", "--workspace", str(tmp_path / "ws"), "--blocks", "0:2", "--reason", "r"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "platform audit: --model-id ID is required: the model id the quarantine names"


def _record(node: str, start: int, end: int) -> ServerRecord:
    now = time.time()
    return ServerRecord(
        node_id=node,
        endpoint="127.0.0.1:5001",
        model_id=MODEL,
        start=start,
        end=end,
        throughput=900.0,
        step_ms_per_block=0.2,
        free_cache_bytes=2**30,
        dtype="float32",
        quant=None,
        updated_at=now,
        expires_at=now + 30,
    )


def test_swarm_status_shows_reputation_beside_each_server(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert ledger_reputation(None, str(ws)) is None  # no ledger: no column values
    good, bad = subj("QmGood", 0, 2), subj("QmBad", 0, 2)  # node ids as the DHT has them (peer ids)
    events: list[AnyEvent] = [
        audit(1, good, check="QmOther"),
        audit(2, good, check="QmOther"),
        audit(3, bad, check="QmGood", verdict=Verdict.FAIL, referee="QmOther", sided="check", agree=False),
        quarantine(4, bad, ["a-003-audit"]),
    ]
    records = [_record("QmGood", 0, 2), _record("QmBad", 0, 2), _record("QmNew", 2, 4), _record("QmGood", 2, 4)]
    assert all(line.split()[-2] == "-" for line in format_status(MODEL, records, 4).splitlines()[2:6])
    assert "reputation" in format_status(MODEL, records, 4).splitlines()[1]
    write_ledger(default_ledger_path(ws), events, LedgerKey.load_or_create(default_ledger_key_path(ws)))
    book = ledger_reputation(None, str(ws))
    assert book is not None
    lines = format_status(MODEL, records, 4, reputation=book).splitlines()[2:6]
    rows = {(line.split()[-1], line.split()[1]): line.rstrip() for line in lines}
    assert rows["QmGood", "0:2"].endswith(" 0.749/2  QmGood")
    assert rows["QmBad", "0:2"].endswith(" 0.333/1 QUARANTINED  QmBad")
    assert rows["QmNew", "2:4"].endswith(" no audits  QmNew")
    assert rows["QmGood", "2:4"].endswith(" no audits  QmGood")  # reputation is per span
    with pytest.raises(LedgerError, match="no ledger at"):
        ledger_reputation(str(tmp_path / "nope.db"), str(ws))


def test_report_steps_over_a_row_that_is_no_longer_an_event(
    workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = sqlite3.connect(default_ledger_path(workspace))
    with db:
        db.execute("DROP TRIGGER ledger_events_no_update")
        db.execute('UPDATE ledger_events SET body = \'{"kind": "nonsense"}\' WHERE seq = 6')
    db.close()
    out = tmp_path / "r.json"
    assert main(["audit", "report", "--workspace", str(workspace), "--out", str(out)]) == 14
    data = json.loads(out.read_text())
    assert data["unreadable_seqs"] == [6] and data["totals"]["events"] == 9
    assert data["chain"]["state"] == "tampered" and data["chain"]["first_bad_seq"] == 6
    assert "seq 6" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["{p}", "sqlite:///{p}", "sqlite+pysqlite:///{p}"])
def test_reading_never_creates_a_ledger(tmp_path: Path, form: str) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(LedgerError, match="no ledger at"):
        open_existing_ledger(form.format(p=path))
    assert not path.exists()


@pytest.mark.parametrize("tampered", [False, True], ids=["clean", "tampered"])
def test_the_one_pass_report_is_the_two_pass_report(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tampered: bool
) -> None:
    """Each format, byte for byte, against what the command wrote when it verified first and
    then read the events again; the same exit code and message for a tampered ledger."""
    if tampered:
        _tamper(workspace, 4)
        db = sqlite3.connect(default_ledger_path(workspace))
        with db:
            db.execute('UPDATE ledger_events SET body = \'{"kind": "nonsense"}\' WHERE seq = 7')
        db.close()
    now = 1_760_000_000.0
    monkeypatch.setattr(build, "time", types.SimpleNamespace(time=lambda: now))
    key = LedgerKey.load_or_create(default_ledger_key_path(workspace))
    with Ledger.open(str(default_ledger_path(workspace))) as ledger:
        reading = two_pass(ledger, key.public_key())
    reference = build_report(reading.events, chain=reading.chain, now=now)
    if reading.unreadable:
        reference = reference.model_copy(update={"unreadable_seqs": reading.unreadable})
    assert reference.unreadable_seqs == ([7] if tampered else [])
    for fmt, render in (("html", render_html), ("json", render_json), ("md", render_markdown)):
        out = tmp_path / f"report.{fmt}"
        assert main(["audit", "report", "--workspace", str(workspace), "--out", str(out)]) == (14 if tampered else 0)
        assert out.read_text() == render(reference)
        err = capsys.readouterr().err
        if tampered:
            assert err == f"platform audit report: {chain_status(reading.chain).message}\n"
            assert "(first bad event: seq 4): event 4: event_hash does not match its contents" in err
    assert main(["audit", "verify", "--workspace", str(workspace)]) == (14 if tampered else 0)


# -- read-only verify, emptied ledgers, witnesses (issue 13) -----------------------------------


def _ledger_files(ws: Path) -> dict[str, str]:
    """Every file beside the ledger, hashed: SQLite's -wal/-shm would show up here."""
    directory = default_ledger_path(ws).parent
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _witness(ws: Path, out: Path) -> Path:
    with Ledger.open_readonly(default_ledger_path(ws)) as ledger:
        ledger.witness().save(out)
    return out


def _verify_args(ws: Path, *extra: str) -> list[str]:
    return ["audit", "verify", "--workspace", str(ws), *extra]


def test_verify_changes_no_byte_of_a_good_or_a_bad_ledger(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _ledger_files(workspace)
    assert main(_verify_args(workspace)) == 0
    assert _ledger_files(workspace) == before
    _tamper(workspace, 4)
    bad = _ledger_files(workspace)
    assert set(bad) == {"ledger.db", "ledger.key"} and bad != before
    assert main(_verify_args(workspace)) == 14
    assert main(["audit", "report", "--workspace", str(workspace), "--out", "-", "--format", "json"]) == 14
    assert _ledger_files(workspace) == bad
    capsys.readouterr()


def test_verify_refuses_an_emptied_file(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = default_ledger_path(workspace)
    db.write_bytes(b"")  # `: > ledger/ledger.db`
    assert main(_verify_args(workspace)) == 14
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(db) in err and "empty" in err, err
    assert db.read_bytes() == b""
    assert sorted(_ledger_files(workspace)) == ["ledger.db", "ledger.key"]
    assert main(["audit", "report", "--workspace", str(workspace), "--out", "-"]) == 14
    assert "Chain verified" not in capsys.readouterr().out


def test_verify_refuses_all_events_deleted_and_an_unsigned_seq_0_head(
    workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = sqlite3.connect(default_ledger_path(workspace))
    with db:
        db.execute("DROP TRIGGER ledger_events_no_delete")
        db.execute("DELETE FROM ledger_events")
        db.execute(f"UPDATE ledger_head SET seq = 0, head_hash = '{'0' * 64}', key_id = NULL, signature = NULL")
    db.close()
    before = _ledger_files(workspace)
    assert main(_verify_args(workspace)) == 14
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(default_ledger_path(workspace)) in err and "not signed" in err, err
    out = tmp_path / "report.md"
    assert main(["audit", "report", "--workspace", str(workspace), "--out", str(out)]) == 14
    assert "Chain verified" not in out.read_text() and "not signed" in out.read_text()
    assert _ledger_files(workspace) == before


def test_a_rollback_to_an_older_signed_copy_fails_against_a_witness(
    workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file restored from a backup taken at seq 10, after more events were signed. Without a
    witness it verifies (by design: the chain alone cannot tell); with the newer one it fails."""
    db = default_ledger_path(workspace)
    shutil.copyfile(db, tmp_path / "backup.db")
    key = LedgerKey.load_or_create(default_ledger_key_path(workspace))
    with Ledger.open(str(db), key=key, writer="coordinator") as ledger:
        ledger.append([audit(n, X, check="node-a") for n in range(100, 106)])
    witness = _witness(workspace, tmp_path / "ledger-witness.json")
    assert main(_verify_args(workspace, "--witness", str(witness))) == 0
    assert "ok: 16 events, head 16 " in capsys.readouterr().out
    shutil.copyfile(tmp_path / "backup.db", db)
    before = _ledger_files(workspace)

    assert main(_verify_args(workspace)) == 0
    assert capsys.readouterr().out.startswith("ok: 10 events, head 10 ")
    assert main(_verify_args(workspace, "--witness", str(witness))) == 14
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rolled back" in err and "seq 10, older than the witness's seq 16" in err, err
    out = tmp_path / "report.json"
    assert main(["audit", "report", "--workspace", str(workspace), "--out", str(out), "--witness", str(witness)]) == 14
    chain = json.loads(out.read_text())["chain"]
    assert chain["state"] == "tampered" and "rolled back" in chain["message"]
    assert "rolled back" in capsys.readouterr().err
    assert _ledger_files(workspace) == before


def test_a_witness_signed_by_another_key_is_refused(
    workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    write_ledger(default_ledger_path(other), scenario(), LedgerKey.load_or_create(default_ledger_key_path(other)))
    witness = _witness(other, tmp_path / "w.json")
    assert main(_verify_args(workspace, "--witness", str(witness))) == 13
    assert "not by the key given" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(_verify_args(workspace, "--witness", str(tmp_path / "bad.json"))) == 13
    assert "not a ledger witness" in capsys.readouterr().err
