"""The ClientApp's work on each message, apart from the ML (the site's round is passed in).

A train message is checked whole before the site's round runs, so that nothing the
coordinator sends can cost the site privacy budget unless the round is one it would
train for: the run config (`TrainConfig`), the node config (`SiteEnv`), the message
(`TrainOrder`: weights float32 and finite, the round number, spot-check orders), whether
it may answer in the clear, secure aggregation's announcement, and the ledger witness (the
coordinator's signed ledger head: the site keeps the newest it has seen in
`<store>/ledger-witness.json` and refuses an older one, a ledger rolled back). The site's round
(`round.train_site_round`) then checks the weights against the model's adapter (names,
shapes) before it charges its ledger.

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
from typing import TYPE_CHECKING, Protocol

import numpy as np
from flwr.app import Context, Message

from corolla.errors import CorollaError
from corolla.federation.messages import (
    SITE_CRASHED,
    SITE_FAILED,
    SITE_REFUSED,
    AuditOrders,
    KeysQuery,
    RecordError,
    TrainOrder,
    TrainReply,
    UnmaskOrder,
    Weights,
    check_like,
    flatten,
    run_key,
    site_error,
)
from corolla.federation.site.env import SiteEnv, SiteRefused, SiteResult
from corolla.federation.site.secure import SecureSite
from corolla.training.config import TrainConfig

if TYPE_CHECKING:  # the ledger imports SQLAlchemy: only when a message carries a witness
    from corolla.verify.ledger import Witness

__all__ = [
    "WITNESS_FILE",
    "PlainUpdateRefused",
    "SiteRound",
    "WitnessRefused",
    "handle_keys_query",
    "handle_train",
    "handle_unmask",
    "reply_or_error",
    "site_name",
]

_log = logging.getLogger(__name__)

WITNESS_FILE = "ledger-witness.json"  # in the site's store: the newest ledger witness it has seen


class SiteRound(Protocol):
    """A site's round of training from `weights`; `SiteRefused` to decline it."""

    def __call__(
        self,
        config: TrainConfig,
        env: SiteEnv,
        weights: Weights,
        *,
        server_round: int,
        run_key: str,
        orders: AuditOrders | None,
    ) -> SiteResult: ...


class PlainUpdateRefused(CorollaError):
    """The run asks for updates in the clear and this site's node config does not allow it."""


class WitnessRefused(SiteRefused):
    """The coordinator's ledger witness is older than the one this site kept, forks from it or
    names another ledger key: the coordinator's ledger was rolled back or replaced."""


def handle_train(
    msg: Message,
    context: Context,
    site_round: SiteRound,
    *,
    refusals: tuple[type[BaseException], ...] = (),
    propagate: bool = False,
) -> Message:
    """Train one round on this site and reply with the update (masked, under secure
    aggregation) and metrics, or an error. `refusals` are exceptions besides `SiteRefused`
    that mean "the site declines" (test doubles). With `propagate` (the in-process run, where
    the operator is the caller) any other error is raised instead of becoming a reply."""
    return reply_or_error(
        msg,
        context,
        lambda: _train(msg, context, site_round),
        refusals=(SiteRefused, PlainUpdateRefused, *refusals),
        propagate=propagate,
    )


def handle_keys_query(msg: Message, context: Context) -> Message:
    """A `query` message: this site's certificates for secure aggregation."""

    def work() -> Message:
        query = KeysQuery.from_content(msg.content)
        secure = SecureSite.for_env(_secure_env(context), run_key=run_key(context))
        return Message(secure.keys_reply(query, flower_node=int(context.node_id)).to_content(), reply_to=msg)

    return reply_or_error(msg, context, work)


def handle_unmask(msg: Message, context: Context) -> Message:
    """A `train.secagg_unmask` message: the second stage of this round's secure aggregation."""

    def work() -> Message:
        order = UnmaskOrder.from_content(msg.content)
        secure = SecureSite.for_env(_secure_env(context), run_key=run_key(context))
        return Message(secure.unmask(order).to_content(), reply_to=msg)

    return reply_or_error(msg, context, work)


def _secure_env(context: Context) -> SiteEnv:
    return SiteEnv.from_node_config(context.node_config, training=False)


def site_name(context: Context) -> str:
    node = context.node_config.get("node")
    return node if isinstance(node, str) and node else f"node-{context.node_id}"


def reply_or_error(
    msg: Message,
    context: Context,
    work: Callable[[], Message],
    *,
    refusals: tuple[type[BaseException], ...] = (),
    propagate: bool = False,
) -> Message:
    """`work()`'s reply, or the error reply the coordinator records: `SITE_REFUSED` for
    `refusals`, `SITE_FAILED` for other Corolla errors, `SITE_CRASHED` for anything else
    (its traceback in the SuperNode's log only). `propagate`: raise what is not a refusal."""
    site = site_name(context)
    try:
        return work()
    except Exception as exc:  # every failure becomes a reply the coordinator can record
        if propagate and not isinstance(exc, refusals):
            raise
        if isinstance(exc, refusals):
            code = SITE_REFUSED
            _log.warning("site %s refused: %s", site, exc)
        elif isinstance(exc, CorollaError):
            code = SITE_FAILED
            _log.error("site %s failed: %s", site, exc)
        else:
            code = SITE_CRASHED
            _log.exception("site %s crashed", site)
        return Message(site_error(code, site=site, exc=exc), reply_to=msg)


def _train(msg: Message, context: Context, site_round: SiteRound) -> Message:
    config = TrainConfig.from_run_config(context.run_config)
    env = SiteEnv.from_node_config(context.node_config)  # the site's identity is loaded here, once
    order = TrainOrder.from_content(msg.content)
    key = run_key(context)
    if config.secure_agg and order.announcement is None:
        raise RecordError("the run uses secure aggregation, but the train message carries no announcement")
    secure, verified = None, None
    if order.announcement is None:
        if not env.allow_plain_updates:
            raise PlainUpdateRefused(
                "the run asks for this site's update in the clear (no secure aggregation); this site's node config "
                "does not set allow-plain-updates = true"
            )
    else:  # refuse a bad announcement before spending privacy budget on the round
        secure = SecureSite.for_env(env, run_key=key)
        verified = secure.check(order.announcement, order.weights, server_round=order.server_round)
    if order.audits is not None and order.audits.witness is not None:
        _keep_witness(env, order.audits.witness)  # before the round: a refused witness costs no budget
    result = site_round(config, env, order.weights, server_round=order.server_round, run_key=key, orders=order.audits)
    try:
        check_like(result.update, order.weights)
        update = _float32(result.update)
    except RecordError as exc:
        raise RecordError(f"the site's update does not fit the weights it was sent: {exc}") from None
    if env.keep_updates:
        _keep_update(env, key, order.server_round, update)
    events = result.audit_events if order.audits is not None else None
    if secure is None or verified is None:
        reply = TrainReply(site=site_name(context), metrics=result.metrics, update=update, events=events)
    else:
        upload, clipped = secure.upload(verified, flatten(update))
        metrics = result.metrics.model_copy(update={"clipped": clipped})
        reply = TrainReply(site=site_name(context), metrics=metrics, upload=upload, events=events)
    return Message(reply.to_content(), reply_to=msg)


def _keep_witness(env: SiteEnv, offered: Witness) -> None:
    """Keep the newest ledger witness seen (by seq); WitnessRefused for an older or forked one."""
    from corolla.verify.errors import LedgerError
    from corolla.verify.ledger import Witness, newer_witness

    path = env.store / WITNESS_FILE
    try:
        kept = Witness.load(path) if path.exists() else None
        newer = newer_witness(kept, offered)
    except LedgerError as exc:  # rolled back, forked, another key, or an unreadable kept file
        raise WitnessRefused(f"refusing the round: {exc}") from None
    if newer is not None:
        newer.save(path)


def _float32(update: Mapping[str, np.ndarray]) -> Weights:
    out: Weights = {}
    for name, value in update.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise RecordError(f"array {name!r} has dtype {array.dtype}; expected floating point")
        if not np.all(np.isfinite(array)):
            raise RecordError(f"array {name!r} holds NaN or infinite values")
        out[name] = array.astype(np.float32, copy=False)
    return out


def _keep_update(env: SiteEnv, run_key: str, server_round: int, update: Weights) -> None:
    """Node config `keep-updates = true`: the site keeps, in its own store, the update it
    contributed (before masking) as `updates/<run key>/round-<n>.npz`, to audit what it sent.
    The file holds what secure aggregation hides from the coordinator: it stays on the site."""
    directory = env.store / "updates" / run_key
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    np.savez(directory / f"round-{server_round}.npz", **update)  # type: ignore[arg-type]
