"""The site's round-state store: private files, one answer per round, no second upload."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from corolla.secure_agg import RefusedRequest, RoundStateError, RoundStateStore, site_upload
from corolla.secure_agg.messages import RoundState, parse
from tests.secure_agg.kit import TRUSTING, Consortium


def test_state_is_private_and_taken_once(consortium: Consortium, tmp_path: Path) -> None:
    agg = consortium.aggregator(3, threshold=2, length=4, run_id="flower-run-42", round=3)
    site = consortium.site(agg.roster[0])
    up = site_upload(agg.announcement, np.zeros(4, np.float32), site, consortium.verifier, policy=TRUSTING)
    store = RoundStateStore(tmp_path / "store")
    path = store.save(up.state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "flower-run-42" not in str(path)  # run ids never become path components
    state = parse(RoundState, up.state)
    assert state.node_id == site.node_id and state.round == 3 and len(state.own_share) == 66
    assert b"agreement_key" in up.state and site.agreement_key.hex().encode() not in up.state
    assert store.take("flower-run-42", 3) == up.state
    with pytest.raises(RoundStateError, match="no state for run flower-run-42 round 3"):
        store.take("flower-run-42", 3)
    with pytest.raises(RoundStateError, match="no state for run other round 3"):
        store.take("other", 3)


def test_a_replayed_or_earlier_announcement_gets_no_second_upload(consortium: Consortium, tmp_path: Path) -> None:
    store = RoundStateStore(tmp_path)
    site = consortium.sites[0]

    def upload(round: int, run_id: str = "run-1") -> bytes:
        agg = consortium.aggregator(3, threshold=2, length=4, round=round, run_id=run_id)
        return site_upload(agg.announcement, np.zeros(4, np.float32), site, consortium.verifier, policy=TRUSTING).state

    store.save(upload(5))
    with pytest.raises(
        RefusedRequest, match="already uploaded for round 5 of run run-1; it will not upload for round 5"
    ):
        store.save(upload(5))
    with pytest.raises(RefusedRequest, match="will not upload for round 4"):
        store.save(upload(4))
    store.take("run-1", 5)
    with pytest.raises(RefusedRequest, match="round 5"):  # also after answering
        store.save(upload(5))
    store.save(upload(6))
    store.save(upload(1, run_id="run-2"))  # runs are independent


def test_garbage_is_not_a_state(tmp_path: Path) -> None:
    with pytest.raises(RoundStateError, match="not a round state"):
        RoundStateStore(tmp_path).save(b"{}")
