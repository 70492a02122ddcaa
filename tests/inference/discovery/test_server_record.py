"""ServerRecord encoding and the checks applied to records read from the DHT (no network)."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.records.record import make_put_record, make_signed_put_record

from corolla.inference.discovery import MAX_RECORD_BYTES, ServerRecord, _keys, _rpc
from corolla.inference.discovery._validator import RecordValidator, check_record
from corolla.inference.errors import DiscoveryError

BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
NODE = "12D3KooWAK671rQ7CKTLqLXvSWvYmk1vtvSsvCwuAcs5U7qPe6yA"


def fields(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "node_id": NODE,
        "endpoint": "10.0.0.7:50051",
        "model_id": "meta-llama/Llama-3-8B",
        "start": 4,
        "end": 12,
        "throughput": 812.5,
        "step_ms_per_block": 1.25,
        "free_cache_bytes": 3 << 30,
        "dtype": "bfloat16",
        "quant": "nf4",
        "updated_at": 1_750_000_000.5,
        "expires_at": 1_750_000_060.5,
        "tls_fingerprint": None,
    }
    base.update(overrides)
    return base


def encode(data: dict[str, object]) -> bytes:
    return json.dumps(data).encode()


def test_round_trip_is_exact_and_compact() -> None:
    record = ServerRecord(**fields(tls_fingerprint="sha256:ab12"))  # type: ignore[arg-type]
    data = record.to_bytes()
    assert ServerRecord.from_bytes(data) == record
    assert b" " not in data  # compact JSON
    assert json.loads(data)["quant"] == "nf4"


@st.composite
def records(draw: st.DrawFn) -> ServerRecord:
    start = draw(st.integers(0, 2**40))
    updated = draw(st.floats(0, 1e11, allow_nan=False))
    finite = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
    return ServerRecord(
        node_id=draw(st.text(BASE58, min_size=1, max_size=64)),
        endpoint=draw(st.sampled_from(["localhost", "10.1.2.3", "[::1]", "gpu-7.example.org"]))
        + f":{draw(st.integers(1, 65535))}",
        model_id=draw(st.text(min_size=1, max_size=256)),
        start=start,
        end=start + draw(st.integers(1, 2**20)),
        throughput=draw(finite),
        step_ms_per_block=draw(finite),
        free_cache_bytes=draw(st.integers(0, 2**63)),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
        quant=draw(st.sampled_from([None, "int8", "nf4"])),
        updated_at=updated,
        expires_at=updated + draw(st.floats(0, 1e6, allow_nan=False)),
        tls_fingerprint=draw(st.none() | st.text(min_size=1, max_size=256)),
    )


@given(records())
def test_to_bytes_from_bytes_round_trips(record: ServerRecord) -> None:
    data = record.to_bytes()
    assert len(data) <= MAX_RECORD_BYTES
    assert ServerRecord.from_bytes(data) == record


@pytest.mark.parametrize("data", [b"", b"{not json", b"\xff\xfe\x00", b"[]", b"null", b'"record"', b"{}"])
def test_malformed_bytes_raise(data: bytes) -> None:
    with pytest.raises(DiscoveryError, match="malformed server record"):
        ServerRecord.from_bytes(data)


@pytest.mark.parametrize("name", [n for n in fields() if n != "tls_fingerprint"])
def test_missing_field_is_named(name: str) -> None:
    data = fields()
    del data[name]
    with pytest.raises(DiscoveryError, match=name):
        ServerRecord.from_bytes(encode(data))


def test_tls_fingerprint_is_optional() -> None:
    data = fields()
    del data["tls_fingerprint"]
    assert ServerRecord.from_bytes(encode(data)).tls_fingerprint is None


def test_extra_field_is_rejected() -> None:
    with pytest.raises(DiscoveryError, match="backdoor"):
        ServerRecord.from_bytes(encode(fields(backdoor=1)))


def test_oversize_is_rejected_before_parsing() -> None:
    padded = encode(fields()) + b" " * MAX_RECORD_BYTES
    with pytest.raises(DiscoveryError, match=str(MAX_RECORD_BYTES)):
        ServerRecord.from_bytes(padded)
    with pytest.raises(DiscoveryError, match=str(MAX_RECORD_BYTES)):
        ServerRecord.from_bytes(b"x" * (MAX_RECORD_BYTES + 1))


@pytest.mark.parametrize(("start", "end"), [(5, 5), (6, 5), (0, 0)])
def test_bad_span_is_rejected(start: int, end: int) -> None:
    with pytest.raises(DiscoveryError, match="end"):
        ServerRecord.from_bytes(encode(fields(start=start, end=end)))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"start": "4"}, "start"),  # no string-to-int coercion
        ({"start": 4.0}, "start"),
        ({"start": True}, "start"),
        ({"start": -1}, "start"),
        ({"throughput": -0.5}, "throughput"),
        ({"free_cache_bytes": -1}, "free_cache_bytes"),
        ({"dtype": "float64"}, "dtype"),
        ({"quant": "int4"}, "quant"),
        ({"model_id": ""}, "model_id"),
        ({"model_id": "m" * 257}, "model_id"),
        ({"node_id": "not base58 0OIl"}, "node_id"),
        ({"endpoint": "10.0.0.7"}, "endpoint"),
        ({"endpoint": "10.0.0.7:0"}, "endpoint"),
        ({"endpoint": "10.0.0.7:70000"}, "endpoint"),
        ({"expires_at": 1_749_999_999.0}, "expires_at"),
    ],
)
def test_bad_field_is_named(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(DiscoveryError, match=field):
        ServerRecord.from_bytes(encode(fields(**overrides)))


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_rejected(token: bytes) -> None:
    data = encode(fields()).replace(b"812.5", token)
    with pytest.raises(DiscoveryError, match="throughput"):
        ServerRecord.from_bytes(data)


def test_non_bytes_input_is_rejected() -> None:
    with pytest.raises(DiscoveryError, match="bytes"):
        ServerRecord.from_bytes(encode(fields()).decode())  # type: ignore[arg-type]


def test_record_is_frozen() -> None:
    record = ServerRecord(**fields())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frozen"):
        record.start = 0


# ----- keys -------------------------------------------------------------------------


def test_record_keys_are_short_and_distinct() -> None:
    key = _keys.record_key("m" * 256, NODE)
    # py-libp2p ignores FIND_NODE for non-multihash keys over 50 bytes.
    assert key.startswith("/corolla/") and len(key.encode()) <= 50
    assert _keys.record_key("a", NODE) != _keys.record_key("b", NODE)
    assert _keys.record_key("a", NODE) != _keys.record_key("a", NODE[:-1] + "b")


def test_next_window_is_provided_before_it_starts() -> None:
    window = _keys.PROVIDER_WINDOW_S
    early = 1000 * window + 1.0
    late = 1001 * window - _keys.PREPROVIDE_S / 2
    assert _keys.provide_windows(early) == [1000]
    assert _keys.provide_windows(late) == [1000, 1001]
    # A client that has moved to the next window finds servers that pre-provided it.
    assert set(_keys.lookup_provider_keys("m", 1001 * window + 0.5)) <= {
        _keys.provider_key("m", w, s) for w in _keys.provide_windows(late) for s in range(_keys.PROVIDER_SHARDS)
    }


# ----- validator and signature checks -----------------------------------------------


def test_validator_binds_record_to_its_key_and_prefers_newest() -> None:
    old = ServerRecord(**fields())  # type: ignore[arg-type]
    new = ServerRecord(**fields(updated_at=1_750_000_010.0, throughput=1.0))  # type: ignore[arg-type]
    key = _keys.record_key(old.model_id, old.node_id)
    validator = RecordValidator()
    validator.validate(key, old.to_bytes())
    with pytest.raises(DiscoveryError, match="another key"):
        validator.validate(_keys.record_key("other-model", old.node_id), old.to_bytes())
    with pytest.raises(DiscoveryError):
        validator.validate(key, b"garbage")
    assert validator.select(key, [old.to_bytes(), new.to_bytes()]) == 1
    assert validator.select(key, [new.to_bytes(), old.to_bytes()]) == 0
    assert validator.select(key, [b"garbage", old.to_bytes()]) == 1
    assert validator.select(key, [old.to_bytes(), old.to_bytes()]) == 1  # ties take the newcomer
    assert check_record(key, new.to_bytes()) == new


def test_records_must_be_signed_by_the_node_they_name() -> None:
    owner, forger = create_new_key_pair(), create_new_key_pair()
    node_id = ID.from_pubkey(owner.public_key).to_base58()
    now = time.time()
    record = ServerRecord(**fields(node_id=node_id, updated_at=now, expires_at=now + 60))  # type: ignore[arg-type]
    key = _keys.record_key(record.model_id, node_id)
    genuine = make_signed_put_record(key.encode(), record.to_bytes(), owner.private_key)
    assert _rpc.verify_server_record(genuine, key) == record

    forged = make_signed_put_record(key.encode(), record.to_bytes(), forger.private_key)
    with pytest.raises(DiscoveryError, match="signed by"):
        _rpc.verify_server_record(forged, key)
    with pytest.raises(DiscoveryError, match="not signed"):
        _rpc.verify_server_record(make_put_record(key.encode(), record.to_bytes()), key)
    tampered = make_signed_put_record(key.encode(), record.to_bytes(), owner.private_key)
    tampered.value = record.model_copy(update={"throughput": 1e9}).to_bytes()
    with pytest.raises(DiscoveryError, match="signature"):
        _rpc.verify_server_record(tampered, key)
