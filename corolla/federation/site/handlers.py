"""The ClientApp's work on a train message, apart from the ML (`site_round_fn`).

The SuperNode's node config says where the site keeps things (keys `data`, `store`,
`workspace`, `node`, optional `max-epsilon`; see `site_env_kwargs`); the run config is the run's `TrainConfig`.
A `SiteRefused` becomes an error reply with code `SITE_REFUSED`, any other Corolla error
`SITE_FAILED`, anything else `SITE_CRASHED` (with its traceback in the SuperNode's log
only): the reason names the site, the exception class and its message, never data.

Flower starts a fresh ClientApp process for every message; what a site keeps between
rounds lives in its `store` (Flower's `context.state` would survive between messages of
one run, but only in the SuperNode's memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Context, Message, RecordDict

from corolla.errors import CorollaError
from corolla.federation import secure
from corolla.federation.audits import VERIFY, SiteOrders, reply_record
from corolla.federation.messages import (
    METRICS,
    ROUND,
    SERVER_ROUND,
    SITE,
    SITE_CRASHED,
    SITE_FAILED,
    SITE_REFUSED,
    UPDATE,
    WEIGHTS,
    RecordError,
    check_like,
    from_array_record,
    run_key,
    site_error,
    to_array_record,
    to_metrics_record,
)
from corolla.training.config import TrainConfig

_log = logging.getLogger(__name__)


class NodeConfigError(CorollaError):
    """The SuperNode's node config lacks a key or names a path that is not there."""

    exit_code = 2


class SiteResultLike(Protocol):
    @property
    def update(self) -> Mapping[str, np.ndarray]: ...  # the site's new weights minus the given ones

    @property
    def metrics(self) -> Mapping[str, float | int | str]: ...  # e.g. loss, epsilon, steps, records, seconds


SiteRoundFn = Callable[..., SiteResultLike]  # (config, env, weights, *, server_round, run_key, orders) -> result


def site_env_kwargs(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """`SiteEnv` fields from a node config: `data` (an existing JSONL file), `store` (a
    directory, made if missing), `workspace` ("" for none, else an existing directory) and
    `node` (the site's name in that workspace)."""
    values: dict[str, str] = {}
    for key in ("data", "store", "workspace", "node"):
        value = node_config.get(key)
        if not isinstance(value, str):
            raise NodeConfigError(f"node config {key!r} = {value!r}: expected a string (set with --node-config)")
        values[key] = value
    data = Path(values["data"]).expanduser()
    if not data.is_file():
        raise NodeConfigError(f"node config 'data' = {values['data']!r}: no such file")
    if not values["store"]:
        raise NodeConfigError("node config 'store' is empty: give the site's private directory")
    store = Path(values["store"]).expanduser()
    store.mkdir(parents=True, exist_ok=True)
    workspace = Path(values["workspace"]).expanduser() if values["workspace"] else None
    if workspace is not None and not workspace.is_dir():
        raise NodeConfigError(f"node config 'workspace' = {values['workspace']!r}: no such directory")
    if workspace is not None and not values["node"]:
        raise NodeConfigError("node config 'node' is empty: name the site's node in its workspace")
    kwargs: dict[str, Any] = {"data": data, "store": store, "workspace": workspace, "node": values["node"]}
    if "max-epsilon" in node_config:  # the site's own cap: runs asking for more, or for no DP, are refused
        cap = node_config["max-epsilon"]
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 < float(cap) < float("inf"):
            raise NodeConfigError(f"node config 'max-epsilon' = {cap!r}: expected a positive number")
        kwargs["max_epsilon"] = float(cap)
    return kwargs


def allow_plain_updates(node_config: Mapping[str, Any]) -> bool:
    """Node config `allow-plain-updates` (default false): whether this site sends its update
    in the clear when a run asks for no secure aggregation. By default it refuses."""
    return _flag(node_config, "allow-plain-updates")


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    value = node_config.get(key, False)
    if not isinstance(value, bool):
        raise NodeConfigError(f"node config {key!r} = {value!r}: expected true or false")
    return value


def _keep_update(context: Context, server_round: int, update: Mapping[str, np.ndarray]) -> None:
    """Node config `keep-updates = true`: the site keeps, in its own store, the update it
    contributed (before masking) as `updates/<run key>/round-<n>.npz`, to audit what it sent.
    The file holds what secure aggregation hides from the coordinator: it stays on the site."""
    directory = Path(str(context.node_config["store"])).expanduser() / "updates" / run_key(context)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    arrays: dict[str, Any] = {k: np.asarray(v, np.float32) for k, v in update.items()}
    np.savez(directory / f"round-{server_round}.npz", **arrays)


class PlainUpdateRefused(CorollaError):
    """The run asks for updates in the clear and this site's node config does not allow it."""


def handle_train(
    msg: Message,
    context: Context,
    site_round_fn: SiteRoundFn,
    *,
    env_type: Callable[..., Any] | None = None,
    refusals: tuple[type[BaseException], ...] | None = None,
) -> Message:
    """Train one round on this site and reply with the update (masked, under secure
    aggregation) and metrics, or an error.

    `env_type` builds the site's environment from `site_env_kwargs` and `refusals` are the
    exceptions that mean "the site declines"; by default `SiteEnv` and `SiteRefused` of
    `corolla.federation.site.round`.
    """

    def work() -> Message:
        nonlocal env_type, refusals
        if env_type is None or refusals is None:
            from corolla.federation.site.round import SiteEnv, SiteRefused

            env_type = SiteEnv if env_type is None else env_type
            refusals = (SiteRefused,) if refusals is None else refusals
        return _train(msg, context, site_round_fn, env_type, site_name(context))

    return reply_or_error(msg, context, work, refusals=lambda: (*(refusals or ()), PlainUpdateRefused))


def handle_keys_query(msg: Message, context: Context) -> Message:
    """A `query` message: this site's certificates for secure aggregation."""
    return reply_or_error(msg, context, lambda: secure.keys_reply(msg, context))


def handle_unmask(msg: Message, context: Context) -> Message:
    """A `train.secagg_unmask` message: the second stage of this round's secure aggregation."""
    return reply_or_error(msg, context, lambda: secure.unmask_reply(msg, context))


def site_name(context: Context) -> str:
    node = context.node_config.get("node")
    return node if isinstance(node, str) and node else f"node-{context.node_id}"


def reply_or_error(
    msg: Message,
    context: Context,
    work: Callable[[], Message],
    *,
    refusals: Callable[[], tuple[type[BaseException], ...]] = tuple,
) -> Message:
    """`work()`'s reply, or the error reply the coordinator records: `SITE_REFUSED` for the
    exceptions `refusals()` names, `SITE_FAILED` for other Corolla errors, `SITE_CRASHED` for
    anything else (its traceback in the SuperNode's log only)."""
    site = site_name(context)
    try:
        return work()
    except Exception as exc:  # every failure becomes a reply the coordinator can record
        if isinstance(exc, refusals()):
            code = SITE_REFUSED
            _log.warning("site %s refused: %s", site, exc)
        elif isinstance(exc, CorollaError):
            code = SITE_FAILED
            _log.error("site %s failed: %s", site, exc)
        else:
            code = SITE_CRASHED
            _log.exception("site %s crashed", site)
        return Message(site_error(code, site=site, exc=exc), reply_to=msg)


def _train(
    msg: Message, context: Context, site_round_fn: SiteRoundFn, env_type: Callable[..., Any], site: str
) -> Message:
    config = TrainConfig.from_run_config(context.run_config)
    env = env_type(**site_env_kwargs(context.node_config))
    content = msg.content
    try:
        weights = from_array_record(content[WEIGHTS])
        server_round = int(content[ROUND][SERVER_ROUND])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"malformed train message: {type(exc).__name__}: {exc}") from None
    announced = secure.SECAGG in content.config_records
    if config.secure_agg and not announced:
        raise RecordError("the run uses secure aggregation, but the train message carries no announcement")
    if not announced and not allow_plain_updates(context.node_config):
        raise PlainUpdateRefused(
            "the run asks for this site's update in the clear (no secure aggregation); this site's node config "
            "does not set allow-plain-updates = true"
        )
    if announced:  # refuse a bad announcement before spending privacy budget on the round
        secure.check_announcement(content, context, weights)
    orders = SiteOrders.from_content(content)
    result = site_round_fn(config, env, weights, server_round=server_round, run_key=run_key(context), orders=orders)
    try:
        check_like(result.update, weights)
        update = to_array_record(result.update)  # float32; refuses non-float and non-finite arrays
    except RecordError as exc:
        raise RecordError(f"the site's update does not fit the weights it was sent: {exc}") from None
    if _flag(context.node_config, "keep-updates"):
        _keep_update(context, server_round, result.update)
    audits = list(getattr(result, "audit_events", ()))  # the round's spot-check verdicts (JSON)
    extra = {VERIFY: reply_record(audits)} if orders is not None else {}
    if not announced:
        metrics = to_metrics_record({**result.metrics, SITE: site})
        return Message(RecordDict({UPDATE: update, METRICS: metrics, **extra}), reply_to=msg)
    upload, clipped = secure.masked_upload(content, context, secure.flatten(result.update))
    metrics = to_metrics_record({**result.metrics, SITE: site, "clipped": clipped})
    return Message(RecordDict({secure.SECAGG: upload, METRICS: metrics, **extra}), reply_to=msg)
