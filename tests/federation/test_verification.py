"""The coordinator's side of spot checks in training: sites' audit reports checked, written to
the real ledger, replayed through the real reputation rule, and quarantines sent back out."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord

from corolla.federation.coordinator.audits import CoordinatorAudits
from corolla.federation.messages import VERIFY, AuditOrders, RecordError, TrainOrder, TrainReply
from corolla.federation.outcomes import AuditInfo, SiteMetrics
from corolla.federation.site.audits import SiteAudits
from corolla.training.config import TrainConfig, TrainConfigError
from corolla.verify.errors import VerifyError
from corolla.verify.events import (
    AuditEvent,
    Comparison,
    QuarantineEvent,
    ReadmitEvent,
    Run,
    Subject,
    Verdict,
    Work,
    canonical_json,
)
from corolla.verify.ledger import Ledger, LedgerKey
from corolla.verify.tolerance import ToleranceTable, load_table, tolerance_for

MODEL = "tiny-llama@abc"


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def audit(node: str, verdict: Verdict, *, reporter: str = "site-a", check: str = "honest-1") -> AuditEvent:
    agree = verdict is Verdict.PASS
    referee = None if agree else Run(node_id="honest-2", precision="float32", output_sha256=_h("good"))
    return AuditEvent(
        event_id=uuid.uuid4().hex,
        at=1.0,
        reporter=reporter,
        subject=Subject(node_id=node, model_id=MODEL, start=0, end=2),
        work=Work.BACKWARD,
        input_sha256=_h("in"),
        primary=Run(node_id=node, precision="float32", output_sha256=_h("good" if agree else "bad")),
        check=Run(node_id=check, precision="float32", output_sha256=_h("good")),
        comparison=Comparison(rel_l2=0.0 if agree else 0.5, max_abs=0.0 if agree else 1.0, agree=agree),
        tolerance_rel_l2=1e-4,
        tolerance_max_abs=1e-3,
        referee=referee,
        referee_vs_primary=None if agree else Comparison(rel_l2=0.5, max_abs=1.0, agree=False),
        referee_vs_check=None if agree else Comparison(rel_l2=0.0, max_abs=0.0, agree=True),
        verdict=verdict,
    )


UPDATE = {"w": np.zeros(2, np.float32)}


def _reply(*events: AuditEvent | QuarantineEvent) -> tuple[AuditEvent | QuarantineEvent | ReadmitEvent, ...]:
    """The events of a site's train reply carrying `events`, as the coordinator reads them."""
    record = TrainReply(site="site-a", metrics=SiteMetrics(), update=UPDATE, events=events).to_content()[VERIFY]
    assert isinstance(record, ConfigRecord)
    return _read(record)


def _read(record: ConfigRecord) -> tuple[AuditEvent | QuarantineEvent | ReadmitEvent, ...]:
    """A train reply whose verify record is `record`, read as the coordinator's loop reads it."""
    content = TrainReply(site="site-a", metrics=SiteMetrics(), update=UPDATE).to_content()
    content[VERIFY] = record
    events = TrainReply.from_content(content, like=UPDATE).events
    assert events is not None
    return events


def _accept(
    audits: CoordinatorAudits,
    events: tuple[AuditEvent | QuarantineEvent | ReadmitEvent, ...],
    *,
    reporter: str | None = "site-a",
) -> int:
    """As the coordinator's loop does: check before the upload is accepted, record after."""
    return audits.record(audits.check(events, reporter=reporter))


def _orders(audits: CoordinatorAudits) -> AuditOrders:
    """The coordinator's orders as a site reads them from the train message's verify record."""
    return AuditOrders.from_record(audits.orders().to_record())


def test_site_audits_go_to_the_ledger_and_a_failure_quarantines(audits: CoordinatorAudits, tmp_path: Path) -> None:
    assert _accept(audits, _reply(audit("bad-node", Verdict.PASS), audit("honest-1", Verdict.PASS))) == 2
    assert audits.round_info() == AuditInfo(audits=2, quarantined=[])
    assert _orders(audits).quarantine == ()

    assert _accept(audits, _reply(audit("bad-node", Verdict.FAIL))) == 1
    assert audits.round_info() == AuditInfo(audits=1, quarantined=["bad-node"])
    orders = _orders(audits)
    assert orders is not None and orders.rate == 0.05
    [quarantine] = orders.quarantine
    assert quarantine.subject.node_id == "bad-node" and quarantine.reporter == "coordinator"

    # The ledger holds the three audits and the coordinator's quarantine, chained and signed.
    key = LedgerKey.load_or_create(tmp_path / "ledger.key")
    with Ledger.open(str(tmp_path / "ledger.db")) as ledger:
        kinds = [stored.event.kind for stored in ledger.events()]
        assert kinds == ["audit", "audit", "audit", "quarantine"]
        assert ledger.verify(key.public_key()).events == 4


def test_quarantines_persist_across_runs_until_readmitted(audits: CoordinatorAudits, tmp_path: Path) -> None:
    _accept(audits, _reply(audit("bad-node", Verdict.FAIL)))
    audits.close()
    config = audits.config
    again = CoordinatorAudits.for_config(config)
    assert again is not None
    orders = _orders(again)
    assert orders is not None and [q.subject.node_id for q in orders.quarantine] == ["bad-node"]
    again.close()

    subject = Subject(node_id="bad-node", model_id=MODEL, start=0, end=2)
    key = LedgerKey.load_or_create(tmp_path / "ledger.key")
    with Ledger.open(str(tmp_path / "ledger.db"), key=key, writer="operator") as ledger:
        ledger.append([ReadmitEvent(event_id=uuid.uuid4().hex, at=2.0, reporter="op", subject=subject, reason="fixed")])
    third = CoordinatorAudits.for_config(config)
    assert third is not None
    orders = _orders(third)
    assert orders is not None and orders.quarantine == ()
    third.close()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (ConfigRecord({"events": ["{not json"]}), "does not parse"),
        (ConfigRecord({"events": "x"}), "must be a list of strings"),
    ],
)
def test_bad_reports_are_refused_and_nothing_is_written(
    audits: CoordinatorAudits, record: ConfigRecord, message: str
) -> None:
    with pytest.raises(RecordError, match=message):
        _accept(audits, _read(record))
    assert audits.ledger.count() == 0


def test_a_site_reports_its_own_audits_and_no_quarantines(audits: CoordinatorAudits) -> None:
    with pytest.raises(RecordError, match="reported as 'site-b' by the site enrolled as 'site-a'"):
        _accept(audits, _reply(audit("bad-node", Verdict.FAIL, reporter="site-b")))
    forged = QuarantineEvent(
        event_id=uuid.uuid4().hex,
        at=1.0,
        reporter="site-a",
        subject=Subject(node_id="honest-1", model_id=MODEL, start=0, end=2),
        evidence=["x" * 32],
        log_likelihood_ratio=99.0,
        reason="a site's word",
    )
    with pytest.raises(RecordError, match="quarantines are the coordinator's to decide"):
        _accept(audits, _reply(forged))
    assert audits.ledger.count() == 0 and audits.round_info().quarantined == []


def test_reused_event_ids_and_unenrolled_reports_are_not_recorded(audits: CoordinatorAudits) -> None:
    first = audit("bad-node", Verdict.FAIL)
    assert _accept(audits, _reply(first)) == 1
    reused = first.model_copy(update={"verdict": Verdict.PASS})  # the same id, other content
    with pytest.raises(RecordError, match="already in the ledger"):
        _accept(audits, _reply(reused))
    with pytest.raises(RecordError, match="already in the ledger"):
        _accept(audits, _reply(first))  # a plain resend is refused too: nothing counts twice
    # Without secure aggregation a site has no enrolled id: its reports are not taken.
    assert _accept(audits, _reply(audit("honest-1", Verdict.PASS)), reporter=None) == 0
    assert audits.ledger.count() == 2  # the first audit and its quarantine


def test_site_orders_are_checked() -> None:
    assert TrainOrder.from_content(TrainOrder(weights=UPDATE, server_round=1).to_content()).audits is None
    with pytest.raises(RecordError, match=r"verify rate 2\.0"):
        AuditOrders.from_record(ConfigRecord({"rate": 2.0, "quarantine": []}))
    with pytest.raises(RecordError, match="non-quarantine event"):
        event = canonical_json(audit("n", Verdict.PASS)).decode()
        AuditOrders.from_record(ConfigRecord({"rate": 0.1, "quarantine": [event]}))


def test_audit_rate_is_validated() -> None:
    with pytest.raises(TrainConfigError, match=r"audit_rate=1\.5"):
        TrainConfig(model="m", out_dir="o", audit_rate=1.5)
    assert CoordinatorAudits.for_config(TrainConfig(model="m", out_dir="o", audit_rate=0.0)) is None


def _calibrated(path: Path, rel_l2: float = 0.0123) -> ToleranceTable:
    """A table as `platform audit calibrate --out` writes it, float32 pairs at `rel_l2`."""
    data = load_table().model_dump(mode="json")
    for entry in data["models"]["tiny"]["tolerances"]["float32/float32"].values():
        entry["rel_l2"] = rel_l2
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    return load_table(path)


def _config_with_table(tmp_path: Path) -> TrainConfig:
    """A run whose ledger lives in `tmp_path` and whose tolerance table is `calibrated.json` there."""
    return TrainConfig(
        model="m",
        out_dir=str(tmp_path / "out"),
        ledger=str(tmp_path / "ledger.db"),
        ledger_key=str(tmp_path / "ledger.key"),
        tolerances=str(tmp_path / "calibrated.json"),
    )


def test_the_runs_tolerance_table_travels_to_every_site(tmp_path: Path) -> None:
    table = _calibrated(tmp_path / "calibrated.json")
    config = _config_with_table(tmp_path)
    assert TrainConfig.from_run_config(config.to_run_config()) == config  # the path reaches the ServerApp
    audits = CoordinatorAudits.for_config(config)
    assert audits is not None
    try:
        assert audits.tolerances == table
        assert audits.checker._tolerances == table  # the coordinator's own audits (of its held-out scoring)
        record = audits.orders().to_record()
        # The table itself travels (sites are other machines), not the coordinator's path to it.
        assert str(tmp_path) not in str(record["tolerances"])
        orders = AuditOrders.from_record(record)
    finally:
        audits.close()
    assert orders is not None and orders.tolerances == table
    assert tolerance_for("float32", "float32", Work.FORWARD, table=orders.tolerances, hidden_size=64).rel_l2 == 0.0123
    site = SiteAudits(orders, reporter="site-a")
    assert site.checker._tolerances == table
    assert site.finish() == ()


def test_without_a_table_the_orders_carry_none(audits: CoordinatorAudits) -> None:
    record = audits.orders().to_record()
    assert "tolerances" not in record and audits.tolerances is None
    orders = AuditOrders.from_record(record)
    assert orders is not None and orders.tolerances is None  # the site uses the shipped table


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{}", r"the coordinator's tolerance table is not a valid tolerance table \(1 error; first: models: "),
        ("not json", r"not a valid tolerance table \(1 error; first: Invalid JSON"),
        (b"{}", "must be a JSON string, not bytes"),
        (["{}"], "must be a JSON string, not list"),
    ],
)
def test_a_site_refuses_a_malformed_table(value: object, message: str) -> None:
    record = ConfigRecord({"rate": 0.1, "quarantine": [], "tolerances": value})  # type: ignore[dict-item]
    with pytest.raises(RecordError, match=message):
        AuditOrders.from_record(record)


def test_a_table_that_no_longer_loads_stops_the_coordinator(tmp_path: Path) -> None:
    (tmp_path / "calibrated.json").write_text('{"format": "corolla-tolerances/2"}')
    config = _config_with_table(tmp_path)
    with pytest.raises(VerifyError, match=r"calibrated\.json is not a valid tolerance table"):
        CoordinatorAudits.for_config(config)
