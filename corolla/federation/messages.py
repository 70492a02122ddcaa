"""What the ServerApp and the ClientApps put in their messages, and how it is checked.

A train message (ServerApp -> SuperNode, Flower message type `train`, group id = round):

    RecordDict({"weights": ArrayRecord(name -> float32 array),
                "round": ConfigRecord({"server-round": int})})

Its reply is either content:

    RecordDict({"update": ArrayRecord(name -> float32 array, the same names and shapes),
                "metrics": ConfigRecord({"site": str, "loss": float, "epsilon": float, ...})})

or an error, `Message(Error(code, reason), reply_to=msg)`, whose reason is a JSON object
{"site": ..., "error": exception class name, "reason": message} for the codes below.
Flower's own error codes (0-8, e.g. 5 = the destination node stopped sending heartbeats)
carry Flower's plain-text reasons.

Anything read from a message is checked: names, shapes, dtype float32, finite values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error

from corolla.errors import CorollaError

Weights = dict[str, np.ndarray]
Metric = float | int | str | bool

WEIGHTS = "weights"
ROUND = "round"
SERVER_ROUND = "server-round"
UPDATE = "update"
METRICS = "metrics"
SITE = "site"  # metrics key naming the site that replied

# Error codes of our ClientApp; Flower's own use 0-8 (flwr.common.constant.ErrorCode).
SITE_REFUSED = 100  # the site declined the round (e.g. its privacy budget is spent)
SITE_FAILED = 101  # a Corolla error on the site: bad node config, bad data, a check failed
SITE_CRASHED = 102  # anything else raised on the site (a bug); its traceback is in the SuperNode log

# Flower's codes that mean "no answer will come": the node is gone or the message expired.
_FLOWER_NODE_UNAVAILABLE = 5
_FLOWER_EXPIRED = (3, 4)  # MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE

Outcome = Literal["refused", "failed", "offline", "missing"]


class RecordError(CorollaError):
    """A message's records are missing, of the wrong kind, or do not match what was sent."""

    exit_code = 2


def run_key(context: Any) -> str:
    """What a site files this run's privacy ledger and secure-aggregation state under, and the
    run id the coordinator's announcements must name: from the Flower context, not from a
    message, so the coordinator cannot start a fresh budget (or round store) in every round."""
    return f"flower-run-{context.run_id}"


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
        raise RecordError(f"array names differ from those sent: missing {missing[:5]}, unexpected {extra[:5]}")


def check_like(arrays: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> None:
    """Raise unless `arrays` has the names and shapes of `like` (before sending them)."""
    check_names(arrays, like)
    for name, value in arrays.items():
        if np.shape(value) != np.shape(like[name]):
            raise RecordError(f"array {name!r} has shape {np.shape(value)}; expected {np.shape(like[name])}")


def from_array_record(record: Any, *, like: Mapping[str, np.ndarray] | None = None) -> Weights:
    """The arrays of `record`, each float32 and finite; with `like`, the names and shapes must match it."""
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"expected an ArrayRecord, got {type(record).__name__}")
    if like is not None:
        check_names(record, like)
    out: Weights = {}
    for name in record:
        try:
            array = record[name].numpy()
        except (TypeError, ValueError) as exc:
            raise RecordError(f"array {name!r} cannot be read: {exc}") from None
        if array.dtype != np.float32:
            raise RecordError(f"array {name!r} has dtype {array.dtype}; expected float32")
        if like is not None and array.shape != np.shape(like[name]):
            raise RecordError(f"array {name!r} has shape {array.shape}; expected {np.shape(like[name])}")
        if not np.all(np.isfinite(array)):
            raise RecordError(f"array {name!r} holds NaN or infinite values")
        out[name] = array
    return out


# --- metrics -----------------------------------------------------------------------------


def to_metrics_record(metrics: Mapping[str, Any]) -> ConfigRecord:
    """Scalars only (numpy scalars become Python ones); a ConfigRecord because it admits strings."""
    clean: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise RecordError(f"metric {key!r} = {value!r}: allowed are str keys and bool/int/float/str values")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"metric {key!r} = {value!r} is not finite")
        clean[key] = value
    return ConfigRecord(clean)


def from_metrics_record(record: Any) -> dict[str, Metric]:
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
    """An error reply as the ServerApp reads it."""

    outcome: Outcome
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
    outcome: Outcome
    if code == SITE_REFUSED:
        outcome = "refused"
    elif code == _FLOWER_NODE_UNAVAILABLE:
        outcome = "offline"
    elif code in _FLOWER_EXPIRED:
        outcome = "missing"
    else:
        outcome = "failed"
    return ReplyError(outcome=outcome, code=code, reason=text, site=site)
