"""A malicious coordinator's tools: requests it signs itself, with whatever split it likes."""

from __future__ import annotations

from corolla.secure_agg import _crypto
from corolla.secure_agg.messages import Kind, UnmaskRequest, pack, signing_input, unpack
from tests.secure_agg.kit import Consortium, Uploaded


def bundle(upload: bytes) -> bytes:
    """An upload without its vector: what an unmask request forwards."""
    frame = unpack(upload, expect=Kind.UPLOAD)
    return pack(Kind.UPLOAD, frame.header, frame.signature)


def signed(consortium: Consortium, kind: Kind, header: bytes) -> bytes:
    return pack(kind, header, _crypto.sign(consortium.coordinator.identity_key, signing_input(kind, header)))


def request(
    consortium: Consortium,
    round_: Uploaded,
    recipient: str,
    *,
    survivors: list[str],
    dropped: list[str],
    bundles_from: list[str] | None = None,
    run_id: str | None = None,
    round: int | None = None,
) -> bytes:
    """An unmask request the coordinator signs, forwarding the real uploads of `bundles_from`
    (by default every survivor but the recipient)."""
    agg = round_.agg
    senders = [s for s in survivors if s != recipient] if bundles_from is None else bundles_from
    header = UnmaskRequest(
        run_id=agg.run_id if run_id is None else run_id,
        round=agg.round if round is None else round,
        digest=agg.digest,
        recipient=recipient,
        survivors=survivors,
        dropped=dropped,
        bundles=[bundle(round_.uploads[s]) for s in senders],
    ).to_json()
    return signed(consortium, Kind.UNMASK_REQUEST, header)
