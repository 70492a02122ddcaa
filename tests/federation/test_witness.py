"""The ledger witness through a round: the coordinator hands every site its ledger's signed
head, and a site keeps the newest it has seen (`<store>/ledger-witness.json`), refusing an
older or forked one before its privacy ledger is charged."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from corolla.federation.coordinator.audits import CoordinatorAudits
from corolla.federation.messages import SITE_FAILED, SITE_REFUSED, VERIFY, AuditOrders, RecordError, read_error
from corolla.federation.site.env import SiteRefused, SiteResult
from corolla.federation.site.handlers import WITNESS_FILE, handle_train
from corolla.federation.site.round import train_site_round
from corolla.verify.ledger import Ledger, LedgerKey, Witness
from corolla.verify.ledger.witness import WITNESS_FORMAT
from tests.federation.test_budget_after_checks import Site, _arrays, _train
from tests.verify.ledger.factories import audit

KEY = LedgerKey.generate()


def _witnesses(tmp_path: Path, name: str, counts: tuple[int, ...], key: LedgerKey = KEY) -> list[Witness]:
    """The signed heads of one ledger after each batch: `counts` events appended at a time."""
    seen = []
    with Ledger.open(str(tmp_path / f"{name}.db"), key=key, writer="coordinator") as ledger:
        n = 0
        for count in counts:
            ledger.append([audit(f"{name}-{i}") for i in range(n, n + count)])
            n += count
            seen.append(ledger.witness())
    return seen


def _orders(witness: Witness | None) -> ConfigRecord:
    return AuditOrders(rate=0.0, witness=witness).to_record()


@pytest.fixture
def site(tiny_llama: Path, consortium: Path, tmp_path: Path) -> Site:
    return Site(tiny_llama, consortium, tmp_path, secure=False)


class _Stop(SiteRefused):
    """Raised by the stand-in round: everything before it ran, nothing was charged."""


def _stop_round(*_args: object, **_kwargs: object) -> SiteResult:
    raise _Stop("the round would run here")


def _send(site: Site, content: RecordDict, *, site_round: object = train_site_round) -> tuple[int, str]:
    message = Message(content, dst_node_id=100, message_type=MessageType.TRAIN, group_id="2")
    reply = handle_train(message, site.context, site_round)  # type: ignore[arg-type]
    assert reply.has_error()
    error = read_error(reply.error)
    return error.code, error.reason


# ---------------------------------------------------------------------- the message


def test_orders_carry_the_witness_and_check_it_on_read(tmp_path: Path) -> None:
    [witness] = _witnesses(tmp_path, "l", (3,))
    assert AuditOrders.from_record(_orders(witness)).witness == witness
    assert AuditOrders.from_record(_orders(None)).witness is None
    bad = _orders(witness)
    bad["witness"] = witness.to_json().replace(WITNESS_FORMAT, "corolla/ledger-witness/v0")
    with pytest.raises(RecordError, match=r"witness.*format"):
        AuditOrders.from_record(bad)
    bad["witness"] = 7
    with pytest.raises(RecordError, match="witness must be a JSON string"):
        AuditOrders.from_record(bad)


def test_the_coordinator_hands_out_its_current_signed_head(audits: CoordinatorAudits, tmp_path: Path) -> None:
    key = LedgerKey.load_or_create(tmp_path / "ledger.key")
    first = AuditOrders.from_record(audits.orders().to_record()).witness
    assert first is not None and first.seq == 0
    first.check(key.public_key())
    audits.ledger.append([audit("x"), audit("y")])
    second = AuditOrders.from_record(audits.orders().to_record()).witness
    assert second is not None and second.seq == 2
    second.check(key.public_key())


# ---------------------------------------------------------------------- the site


def test_a_site_keeps_the_newest_witness(site: Site, tmp_path: Path) -> None:
    w3, w5 = _witnesses(tmp_path, "l", (3, 2))
    kept = site.store / WITNESS_FILE
    for witness in (w3, w5):
        code, reason = _send(
            site, _train(_arrays(site.weights), None, **{VERIFY: _orders(witness)}), site_round=_stop_round
        )
        assert (code, reason.split(":")[0]) == (SITE_REFUSED, "_Stop"), reason
        assert Witness.load(kept) == witness
    before = kept.read_bytes()
    _send(site, _train(_arrays(site.weights), None, **{VERIFY: _orders(w5)}), site_round=_stop_round)
    _send(site, _train(_arrays(site.weights), None, **{VERIFY: _orders(None)}), site_round=_stop_round)
    assert kept.read_bytes() == before


@pytest.mark.parametrize("case", ["older", "forked", "another key"])
def test_an_older_witness_is_refused_before_the_ledger_is_charged(site: Site, tmp_path: Path, case: str) -> None:
    """The coordinator's ledger was rolled back (or replaced): the site refuses the round, and its
    store, its privacy ledger and the witness it keeps included, is byte-for-byte unchanged."""
    w3, w5 = _witnesses(tmp_path, "l", (3, 2))
    w5.save(site.store / WITNESS_FILE)
    offered = {
        "older": w3,
        "forked": _witnesses(tmp_path, "fork", (5,))[0],
        "another key": _witnesses(tmp_path, "other", (9,), key=LedgerKey.generate())[0],
    }[case]
    before = site.store_bytes()
    assert any(name.startswith("privacy/") for name in before), before.keys()
    code, reason = _send(site, _train(_arrays(site.weights), None, **{VERIFY: _orders(offered)}))
    assert code == SITE_REFUSED, reason
    assert reason.startswith("WitnessRefused: refusing the round: "), reason
    expected = {"older": "rolled back", "forked": "forked", "another key": "signed by key"}[case]
    assert expected in reason
    assert site.store_bytes() == before


def test_a_malformed_witness_is_refused_before_the_ledger_is_charged(site: Site, tmp_path: Path) -> None:
    [w3] = _witnesses(tmp_path, "l", (3,))
    orders = _orders(w3)
    orders["witness"] = w3.to_json().replace(w3.signature, "zz" * 64)
    before = site.store_bytes()
    code, reason = _send(site, _train(_arrays(site.weights), None, **{VERIFY: orders}))
    assert code == SITE_FAILED and reason.startswith("RecordError: "), reason
    assert site.store_bytes() == before


def test_an_unreadable_kept_witness_refuses_rather_than_forgets(site: Site, tmp_path: Path) -> None:
    [w3] = _witnesses(tmp_path, "l", (3,))
    (site.store / WITNESS_FILE).write_text("{")
    before = site.store_bytes()
    code, reason = _send(site, _train(_arrays(site.weights), None, **{VERIFY: _orders(w3)}))
    assert code == SITE_REFUSED and "not a ledger witness" in reason, reason
    assert site.store_bytes() == before
