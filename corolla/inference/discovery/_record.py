"""The record a block server announces in the DHT, and its wire encoding.

Everything read from the network passes through `ServerRecord.from_bytes`: any DHT peer
can hand us arbitrary bytes, so the model is strict (no type coercion, no unknown
fields, finite numbers only) and the encoded size is bounded. The bound also keeps us
far below py-libp2p's length-prefixed reader limits (a few MB), which fail in unhelpful
ways when exceeded.
"""

from __future__ import annotations

import re
from typing import Literal, Self

import pydantic
from pydantic import ConfigDict, Field

from corolla.inference.errors import DiscoveryError

MAX_RECORD_BYTES = 8 * 1024
"""Largest encoded record accepted; real records are a few hundred bytes."""

_ENDPOINT_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")
_BASE58_RE = r"^[1-9A-HJ-NP-Za-km-z]+$"
_ERROR_INPUT_CHARS = 80  # how much of a bad value an error message quotes


class ServerRecord(pydantic.BaseModel):
    """What a block server tells clients about itself, for one model.

    A client routes over these records, so a wrong value misroutes requests: every
    field is validated, and `from_bytes` turns any failure into `DiscoveryError`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    node_id: str = Field(min_length=1, max_length=64, pattern=_BASE58_RE)
    """libp2p peer id (base58) of the announcing node; must match the record's signer."""
    endpoint: str = Field(min_length=3, max_length=256)
    """gRPC address, "host:port" or "[v6]:port"."""
    model_id: str = Field(min_length=1, max_length=256)
    start: int = Field(ge=0)
    """First block served."""
    end: int = Field(gt=0)
    """One past the last block served."""
    throughput: float = Field(ge=0)
    """Forward tokens/s through one block."""
    step_ms_per_block: float = Field(ge=0)
    """One-token inference step latency per block, in ms."""
    free_cache_bytes: int = Field(ge=0)
    dtype: Literal["float32", "bfloat16", "float16"]
    quant: Literal["int8", "nf4"] | None
    updated_at: float = Field(ge=0)
    """Unix seconds when written; the newest record of a node wins."""
    expires_at: float = Field(ge=0)
    """Unix seconds after which the record is ignored."""
    tls_fingerprint: str | None = Field(default=None, min_length=1, max_length=256)
    """SHA-256 (hex) of the server's TLS certificate; clients accept only that certificate."""
    certificate: str | None = Field(default=None, min_length=1, max_length=4096)
    """The node's identity certificate (base64 DER), checked against the consortium CA."""

    @pydantic.field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        match = _ENDPOINT_RE.match(value)
        if match is None or not 1 <= int(match.group(1)) <= 65535:
            raise ValueError(f"endpoint must be 'host:port' with port 1-65535, got {value!r}")
        return value

    @pydantic.model_validator(mode="after")
    def _check_order(self) -> Self:
        if self.end <= self.start:
            raise ValueError(f"block span must have end > start, got start={self.start}, end={self.end}")
        if self.expires_at < self.updated_at:
            raise ValueError(f"expires_at ({self.expires_at}) must not be before updated_at ({self.updated_at})")
        return self

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON, the value stored in the DHT."""
        data = self.model_dump_json().encode("utf-8")
        if len(data) > MAX_RECORD_BYTES:
            raise DiscoveryError(f"server record is {len(data)} bytes, above the {MAX_RECORD_BYTES} limit")
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> ServerRecord:
        """Parse and validate a record read from the network.

        Raises `DiscoveryError` naming the bad field for anything malformed or larger
        than `MAX_RECORD_BYTES`.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DiscoveryError(f"server record must be bytes, got {type(data).__name__}")
        if len(data) > MAX_RECORD_BYTES:
            raise DiscoveryError(f"server record is {len(data)} bytes, above the {MAX_RECORD_BYTES} limit")
        try:
            return cls.model_validate_json(bytes(data))
        except pydantic.ValidationError as exc:
            raise DiscoveryError(f"malformed server record: {_describe(exc)}") from None


def _describe(exc: pydantic.ValidationError) -> str:
    """One line per problem: field, what is wrong, and (a bounded quote of) the value."""
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "<record>"
        shown = repr(err.get("input"))
        if len(shown) > _ERROR_INPUT_CHARS:
            shown = shown[:_ERROR_INPUT_CHARS] + "..."
        parts.append(f"{field}: {err['msg']} (got {shown})")
    return "; ".join(parts)
