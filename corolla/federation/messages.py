"""What the coordinator and the sites put in their Flower messages, typed, and the one place
where it is converted to and from Flower's `RecordDict`.

Each message content is a frozen dataclass with `to_content()` (what is sent) and
`from_content()` (what is received, every field checked: names, shapes, dtype float32,
finite values, types and ranges). Neither side reads a `RecordDict` anywhere else.

A train message (coordinator -> site, Flower message type `train`, group id = round):

    {"weights": ArrayRecord(name -> float32), "round": {"server-round": int},
     "secagg": {"announcement": bytes}?,                      # secure aggregation's signed roster
     "verify": {"rate": float, "quarantine": [event JSON], "tolerances": table JSON?,
                "witness": signed ledger head JSON?}?}     # corolla.verify.ledger.witness

Its reply is either content,

    {"update": ArrayRecord}  or  {"secagg": {"upload": bytes}},   # in the clear, or masked
    {"metrics": {"site": str, "epsilon": float, ...}, "verify": {"events": [event JSON]}?}

or an error, `Message(Error(code, reason), reply_to=msg)`, whose reason is a JSON object
{"site": ..., "error": exception class name, "reason": message} for our codes below.
Flower's own error codes (0-8, e.g. 5 = the destination node stopped sending heartbeats)
carry Flower's plain-text reasons. Secure aggregation adds a `query` for a site's keys and
a `train.secagg_unmask` stage (`KeysQuery`, `KeysReply`, `UnmaskOrder`, `UnmaskReply`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MessageType, MetricRecord, RecordDict
from pydantic import ValidationError

from corolla.errors import CorollaError
from corolla.federation.outcomes import SiteMetrics, Status
from corolla.verify.events import AuditEvent, QuarantineEvent, ReadmitEvent, canonical_json, parse_event

if TYPE_CHECKING:  # the tolerance module imports torch, the ledger SQLAlchemy: not at import time
    from corolla.verify.ledger import Witness
    from corolla.verify.tolerance import ToleranceTable

__all__ = [
    "MAX_EVENTS",
    "SITE_CRASHED",
    "SITE_FAILED",
    "SITE_REFUSED",
    "UNMASK_ACTION",
    "UNMASK_MESSAGE_TYPE",
    "AuditOrders",
    "KeysQuery",
    "KeysReply",
    "RecordError",
    "ReplyError",
    "TrainOrder",
    "TrainReply",
    "UnmaskOrder",
    "UnmaskReply",
    "Weights",
    "check_like",
    "flatten",
    "from_array_record",
    "from_metrics_record",
    "read_error",
    "run_key",
    "site_error",
    "to_array_record",
    "to_metrics_record",
    "unflatten",
]

Weights = dict[str, npt.NDArray[np.float32]]
Metric = float | int | str | bool
Event = AuditEvent | QuarantineEvent | ReadmitEvent
_ConfigValue = int | float | str | bytes | bool | list[int] | list[float] | list[str] | list[bytes] | list[bool]

WEIGHTS = "weights"
ROUND = "round"
SERVER_ROUND = "server-round"
UPDATE = "update"
METRICS = "metrics"
SITE = "site"  # metrics key naming the site that replied
SECAGG = "secagg"  # the ConfigRecord every secure-aggregation message carries
VERIFY = "verify"  # the ConfigRecord of spot-check orders (train) and verdicts (reply)
UNMASK_ACTION = "secagg_unmask"  # ClientApp action: message type "train.secagg_unmask"
UNMASK_MESSAGE_TYPE = f"{MessageType.TRAIN}.{UNMASK_ACTION}"
MAX_EVENTS = 10_000  # audit events one reply may carry
MAX_QUARANTINES = 100_000  # quarantine events one train message may carry (they persist across runs)

# Error codes of our ClientApp; Flower's own use 0-8 (flwr.common.constant.ErrorCode).
SITE_REFUSED = 100  # the site declined the round (e.g. its privacy budget is spent)
SITE_FAILED = 101  # a Corolla error on the site: bad node config, bad data, a check failed
SITE_CRASHED = 102  # anything else raised on the site (a bug); its traceback is in the SuperNode log

# Flower's codes that mean "no answer will come": the node is gone or the message expired.
_FLOWER_NODE_UNAVAILABLE = 5
_FLOWER_EXPIRED = (3, 4)  # MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE


class RecordError(CorollaError):
    """A message's records are missing, of the wrong kind, or do not match what was sent."""

    exit_code = 2


class _RunContext(Protocol):
    @property
    def run_id(self) -> int: ...


def run_key(context: _RunContext) -> str:
    """What a site files this run's privacy ledger and secure-aggregation state under, and the
    run id the coordinator's announcements must name: from the Flower context, not from a
    message, so the coordinator cannot start a fresh budget (or round store) in every round."""
    return f"flower-run-{context.run_id}"


# --- train ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditOrders:
    """What the coordinator asks of a site's spot checks this round."""

    rate: float  # fraction of span computations to audit (0: none)
    quarantine: tuple[QuarantineEvent, ...] = ()  # nodes to route around from the start
    tolerances: ToleranceTable | None = None  # the coordinator's tolerance table; None: the shipped one
    witness: Witness | None = None  # the ledger's signed head now: sites keep the newest they have seen

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not 0 <= self.rate <= 1:
            raise RecordError(f"verify rate {self.rate!r} must be a number in [0, 1]")

    def to_record(self) -> ConfigRecord:
        record = ConfigRecord(
            {"rate": float(self.rate), "quarantine": [canonical_json(e).decode() for e in self.quarantine]}
        )
        if self.tolerances is not None:
            record["tolerances"] = self.tolerances.model_dump_json()
        if self.witness is not None:
            record["witness"] = self.witness.to_json()
        return record

    @classmethod
    def from_record(cls, record: object) -> AuditOrders:
        if not isinstance(record, ConfigRecord):
            raise RecordError(f"the {VERIFY!r} record is not a ConfigRecord")
        rate = record.get("rate")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
            raise RecordError(f"verify rate {rate!r} must be a number in [0, 1]")
        events = []
        for event in _events(record.get("quarantine", []), limit=MAX_QUARANTINES):
            if not isinstance(event, QuarantineEvent):
                raise RecordError("the verify record's quarantine list holds a non-quarantine event")
            events.append(event)
        return cls(
            rate=float(rate),
            quarantine=tuple(events),
            tolerances=_table(record.get("tolerances")),
            witness=_witness(record.get("witness")),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainOrder:
    """A train message: the round's weights, and what else the coordinator asks."""

    weights: Weights
    server_round: int
    announcement: bytes | None = None  # secure aggregation's signed announcement; None: a plain round
    audits: AuditOrders | None = None  # spot-check orders; None: no spot checks

    def to_content(self) -> RecordDict:
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            WEIGHTS: to_array_record(self.weights),
            ROUND: ConfigRecord({SERVER_ROUND: self.server_round}),
        }
        if self.announcement is not None:
            records[SECAGG] = ConfigRecord({"announcement": self.announcement})
        if self.audits is not None:
            records[VERIFY] = self.audits.to_record()
        return RecordDict(records)

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainOrder:
        """Every part checked: weights float32 and finite, the round an int >= 1, the
        announcement bytes, the spot-check orders well-formed."""
        try:
            weights = from_array_record(content[WEIGHTS])
        except KeyError:
            raise RecordError("malformed train message: no weights") from None
        server_round = _server_round(content)
        announcement = _bytes(content[SECAGG], "announcement") if SECAGG in content else None
        audits = AuditOrders.from_record(content[VERIFY]) if VERIFY in content else None
        return cls(weights=weights, server_round=server_round, announcement=announcement, audits=audits)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainReply:
    """A site's answer to a train message: its update in the clear or masked, its metrics,
    and its spot-check verdicts when it was given orders."""

    site: str  # the site's own name
    metrics: SiteMetrics
    update: Weights | None = None  # a plain round
    upload: bytes | None = None  # a secure round: the masked update
    events: tuple[Event, ...] | None = None  # its audit verdicts; None: it had no orders

    def __post_init__(self) -> None:
        if (self.update is None) == (self.upload is None):
            raise RecordError("a train reply carries either an update or a masked upload")

    def to_content(self) -> RecordDict:
        metrics = {**self.metrics.model_dump(exclude_none=True), SITE: self.site}
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {METRICS: to_metrics_record(metrics)}
        if self.update is not None:
            records[UPDATE] = to_array_record(self.update)
        if self.upload is not None:
            records[SECAGG] = ConfigRecord({"upload": self.upload})
        if self.events is not None:
            records[VERIFY] = ConfigRecord({"events": [canonical_json(e).decode() for e in self.events]})
        return RecordDict(records)

    @classmethod
    def from_content(cls, content: RecordDict, *, like: Mapping[str, np.ndarray] | None) -> TrainReply:
        """`like`: the weights sent, for a plain round (the update must match them); None for a
        secure round (the aggregator checks the upload)."""
        try:
            raw = from_metrics_record(content[METRICS])
        except KeyError:
            raise RecordError("the reply carries no metrics") from None
        site = raw.pop(SITE, None)
        try:
            metrics = SiteMetrics.model_validate(raw)
        except ValidationError as exc:
            raise RecordError(f"the reply's metrics do not check: {_first_error(exc)}") from None
        update = upload = None
        if like is not None:
            if UPDATE not in content:
                raise RecordError("the reply carries no update")
            update = from_array_record(content[UPDATE], like=like)
        else:
            if SECAGG not in content:
                raise RecordError("the reply carries no secure-aggregation upload")
            upload = _bytes(content[SECAGG], "upload")
        events = None
        if VERIFY in content:
            record = content[VERIFY]
            if not isinstance(record, ConfigRecord):
                raise RecordError(f"the {VERIFY!r} record is not a ConfigRecord")
            events = tuple(_events(record.get("events", [])))
        name = site if isinstance(site, str) and site else ""
        return cls(site=name, metrics=metrics, update=update, upload=upload, events=events)


# --- secure aggregation's own stages --------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class KeysQuery:
    """Once per run and node: the site's certificates, with a fresh nonce it must sign."""

    run_id: str
    nonce: bytes

    def to_content(self) -> RecordDict:
        return RecordDict({SECAGG: ConfigRecord({"ask": "keys", "run-id": self.run_id, "nonce": self.nonce})})

    @classmethod
    def from_content(cls, content: RecordDict) -> KeysQuery:
        record = _record(content, SECAGG)
        if record.get("ask") != "keys":
            raise RecordError(f"unknown secure-aggregation query {record.get('ask')!r}")
        run_id, nonce = record.get("run-id"), record.get("nonce")
        if not isinstance(run_id, str):
            raise RecordError("the keys query lacks its run id")
        if not isinstance(nonce, bytes):
            raise RecordError("the keys query carries no nonce: this site signs its keys only over a fresh one")
        return cls(run_id=run_id, nonce=nonce)


@dataclass(frozen=True, kw_only=True, slots=True)
class KeysReply:
    """A site's certificates (DER) and its proof that it holds the identity key."""

    node_id: str
    identity_cert: bytes
    agreement_cert: bytes
    proof: bytes

    def to_content(self) -> RecordDict:
        record = ConfigRecord(
            {
                "node-id": self.node_id,
                "identity-cert": self.identity_cert,
                "agreement-cert": self.agreement_cert,
                "proof": self.proof,
            }
        )
        return RecordDict({SECAGG: record})

    @classmethod
    def from_content(cls, content: RecordDict) -> KeysReply:
        record = _record(content, SECAGG)
        node_id = record.get("node-id")
        if not isinstance(node_id, str):
            raise RecordError("the keys reply lacks its node id")
        return cls(
            node_id=node_id,
            identity_cert=_bytes(record, "identity-cert"),
            agreement_cert=_bytes(record, "agreement-cert"),
            proof=_bytes(record, "proof"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class UnmaskOrder:
    """Stage 2 of a secure round: what the site must reveal for the survivors and the dropped."""

    request: bytes
    server_round: int

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                SECAGG: ConfigRecord({"request": self.request}),
                ROUND: ConfigRecord({SERVER_ROUND: self.server_round}),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> UnmaskOrder:
        try:
            request = _bytes(content[SECAGG], "request")
        except KeyError:
            raise RecordError("malformed unmask message: no request") from None
        return cls(request=request, server_round=_server_round(content))


@dataclass(frozen=True, kw_only=True, slots=True)
class UnmaskReply:
    reply: bytes

    def to_content(self) -> RecordDict:
        return RecordDict({SECAGG: ConfigRecord({"reply": self.reply})})

    @classmethod
    def from_content(cls, content: RecordDict) -> UnmaskReply:
        return cls(reply=_bytes(_record(content, SECAGG), "reply"))


def flatten(weights: Mapping[str, np.ndarray]) -> npt.NDArray[np.float32]:
    """The arrays in sorted name order as one float32 vector (what secure aggregation masks)."""
    return np.concatenate([np.asarray(weights[name], dtype=np.float32).ravel() for name in sorted(weights)])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> Weights:
    """`flatten`'s inverse, shaped like `like`."""
    size = sum(int(np.size(like[n])) for n in like)
    if vector.shape != (size,):
        raise RecordError(f"the aggregate has shape {vector.shape}; the weights have {size} values")
    out: Weights = {}
    at = 0
    for name in sorted(like):
        size = int(np.size(like[name]))
        out[name] = vector[at : at + size].reshape(np.shape(like[name])).astype(np.float32)
        at += size
    return out


# --- arrays ------------------------------------------------------------------------------


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """float32 arrays by name, names kept exactly; refuses non-float or non-finite arrays."""
    record = ArrayRecord()
    for name, value in arrays.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise RecordError(f"array {name!r} has dtype {array.dtype}; expected floating point (sent as float32)")
        array = array.astype(np.float32, copy=False)
        if not np.all(np.isfinite(array)):
            raise RecordError(f"array {name!r} holds NaN or infinite values")
        record[name] = Array(array)
    return record


def check_names(names: Iterable[str], like: Mapping[str, np.ndarray]) -> None:
    """Raise unless `names` are exactly the names of `like`."""
    names = set(names)
    if names != set(like):
        missing, extra = sorted(set(like) - names), sorted(names - set(like))
        raise RecordError(f"array names differ from those expected: missing {missing[:5]}, unexpected {extra[:5]}")


def check_like(arrays: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray | tuple[int, ...]]) -> None:
    """Raise unless `arrays` has the names and shapes of `like` (arrays, or shapes)."""
    check_names(arrays, like)  # type: ignore[arg-type]
    for name, value in arrays.items():
        want = like[name] if isinstance(like[name], tuple) else np.shape(like[name])
        if np.shape(value) != want:
            raise RecordError(f"array {name!r} has shape {np.shape(value)}; expected {want}")


def from_array_record(record: object, *, like: Mapping[str, np.ndarray] | None = None) -> Weights:
    """The arrays of `record`, each float32 and finite; with `like`, the names and shapes must match it."""
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"expected an ArrayRecord, got {type(record).__name__}")
    if like is not None:
        check_names(record, like)
    out: Weights = {}
    for name in record:
        array = _read_array(name, record[name], like[name] if like is not None else None)
        if array.dtype != np.float32:
            raise RecordError(f"array {name!r} has dtype {array.dtype}; expected float32")
        if like is not None and array.shape != np.shape(like[name]):
            raise RecordError(f"array {name!r} has shape {array.shape}; expected {np.shape(like[name])}")
        if not np.all(np.isfinite(array)):
            raise RecordError(f"array {name!r} holds NaN or infinite values")
        out[name] = array
    return out


MAX_ARRAY_VALUES = 1 << 31  # a float32 array the peer says it sends: at most 8 GiB


def _read_array(name: str, array: Array, like: np.ndarray | None) -> npt.NDArray[np.float32]:
    """One array's bytes as the peer sent them: its declared kind, dtype and shape are checked
    (against `like` when given) before anything is decoded, and the bytes must hold exactly
    that one float32 `.npy` array (`np.load` refuses pickles; npz, empty and truncated data are
    refused too), so a peer cannot make the reader allocate what it did not send."""
    shape = tuple(array.shape)
    if array.stype != "numpy.ndarray":
        raise RecordError(f"array {name!r} is a {array.stype}; expected a numpy array")
    if array.dtype != "float32":
        raise RecordError(f"array {name!r} has dtype {array.dtype}; expected float32")
    if not all(isinstance(n, int) and n >= 0 for n in shape) or math.prod(shape) > MAX_ARRAY_VALUES:
        raise RecordError(f"array {name!r} declares shape {shape}")
    if like is not None and shape != np.shape(like):
        raise RecordError(f"array {name!r} has shape {shape}; expected {np.shape(like)}")
    if len(array.data) < 4 * math.prod(shape) or len(array.data) > 4 * math.prod(shape) + 4096:
        raise RecordError(f"array {name!r} carries {len(array.data)} bytes for shape {shape}")
    try:
        value = array.numpy()
    except Exception as exc:  # whatever np.load makes of bytes a peer chose: refused, typed
        raise RecordError(f"array {name!r} cannot be read: {type(exc).__name__}") from None
    if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.shape != shape:
        raise RecordError(f"array {name!r} does not hold the float32 array of shape {shape} it declares")
    return value


# --- metrics -----------------------------------------------------------------------------


def to_metrics_record(metrics: Mapping[str, Metric | np.generic]) -> ConfigRecord:
    """Scalars only (numpy scalars become Python ones); a ConfigRecord because it admits strings."""
    clean: dict[str, _ConfigValue] = {}
    for key, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise RecordError(f"metric {key!r} = {value!r}: allowed are str keys and bool/int/float/str values")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"metric {key!r} = {value!r} is not finite")
        clean[key] = value
    return ConfigRecord(clean)


def from_metrics_record(record: object) -> dict[str, Metric]:
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"expected a ConfigRecord of metrics, got {type(record).__name__}")
    out: dict[str, Metric] = {}
    for key, value in record.items():
        if not isinstance(value, bool | int | float | str):
            raise RecordError(f"metric {key!r} = {value!r} is not a scalar")
        out[key] = value
    return out


# --- errors ------------------------------------------------------------------------------


def site_error(code: int, *, site: str, exc: BaseException) -> Error:
    """The error a site replies with: which site, which exception, why (no traceback)."""
    reason = json.dumps({"site": site, "error": type(exc).__name__, "reason": str(exc)}, ensure_ascii=False)
    return Error(code=code, reason=reason)


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplyError:
    """An error reply as the coordinator reads it."""

    outcome: Status
    code: int
    reason: str
    site: str | None  # the site's own name, when our ClientApp wrote the error


def read_error(error: Error) -> ReplyError:
    code, text = int(error.code), error.reason or ""
    site = None
    if code in (SITE_REFUSED, SITE_FAILED, SITE_CRASHED):
        try:
            payload = json.loads(text)
            site = str(payload["site"])
            text = f"{payload['error']}: {payload['reason']}"
        except (ValueError, TypeError, KeyError):
            pass  # not ours after all: keep Flower's text
    if code == SITE_REFUSED:
        outcome = Status.REFUSED
    elif code == _FLOWER_NODE_UNAVAILABLE:
        outcome = Status.OFFLINE
    elif code in _FLOWER_EXPIRED:
        outcome = Status.MISSING
    else:
        outcome = Status.FAILED
    return ReplyError(outcome=outcome, code=code, reason=text, site=site)


# --- helpers -------------------------------------------------------------------------------


def _record(content: RecordDict, key: str) -> ConfigRecord:
    try:
        record = content[key]
    except KeyError:
        raise RecordError(f"the message carries no {key!r} record") from None
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"expected a ConfigRecord {key!r}, got {type(record).__name__}")
    return record


def _bytes(record: object, key: str) -> bytes:
    """`record[key]` when `record` is a ConfigRecord holding bytes there."""
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"expected a ConfigRecord {SECAGG!r}, got {type(record).__name__}")
    value = record.get(key)
    if not isinstance(value, bytes):
        raise RecordError(f"the {SECAGG!r} record lacks bytes {key!r}")
    return value


def _server_round(content: RecordDict) -> int:
    try:
        value = content[ROUND][SERVER_ROUND]
    except (KeyError, TypeError) as exc:
        raise RecordError(f"malformed message: no server round ({type(exc).__name__}: {exc})") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecordError(f"malformed message: server round {value!r} is not a round number")
    return value


def _events(value: object, *, limit: int = MAX_EVENTS) -> list[Event]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError("the verify record's event list must be a list of strings")
    texts: Sequence[str] = value
    if len(texts) > limit:
        raise RecordError(f"{len(texts)} audit events in one message; at most {limit}")
    events: list[Event] = []
    for text in texts:
        try:
            events.append(parse_event(text))
        except ValidationError as exc:
            raise RecordError(
                f"an audit event does not parse: {exc.error_count()} errors, first: {_first_error(exc)}"
            ) from None
    return events


def _witness(value: object) -> Witness | None:
    """The train message's ledger witness, its fields checked (format, seq, hex lengths); the
    site cannot check its signature (it holds no ledger key), an auditor does. None: none sent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"the verify record's witness must be a JSON string, not {type(value).__name__}")
    from corolla.verify.ledger import Witness, WitnessError

    try:
        return Witness.from_json(value, source="the coordinator's ledger witness")
    except WitnessError as exc:
        raise RecordError(f"refusing the train message: {exc}") from None


def _table(value: object) -> ToleranceTable | None:
    """The train message's tolerance table, checked as `load_table` checks a file; None when
    the message carries none (the run uses the shipped table)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"the verify record's tolerance table must be a JSON string, not {type(value).__name__}")
    from corolla.verify.errors import VerifyError
    from corolla.verify.tolerance import parse_table

    try:
        return parse_table(value, where="the coordinator's tolerance table")
    except VerifyError as exc:
        raise RecordError(f"refusing the train message: {exc}") from None


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first['msg']}" if where else str(first["msg"])
