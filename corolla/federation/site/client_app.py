"""The ClientApp of `platform train`: `handle_train` with the site's DP-SGD round, and the
site's two secure-aggregation answers (its certificates; the unmask stage)."""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from corolla.federation.secure import UNMASK_ACTION
from corolla.federation.site.handlers import (
    SiteResultLike,
    handle_keys_query,
    handle_train,
    handle_unmask,
)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    # `handle_train` imports `SiteEnv` and `SiteRefused` itself, so a failing import is an error reply.
    return handle_train(msg, context, _train_site_round)


@app.train(UNMASK_ACTION)
def unmask(msg: Message, context: Context) -> Message:
    return handle_unmask(msg, context)


@app.query()
def keys(msg: Message, context: Context) -> Message:
    return handle_keys_query(msg, context)


def _train_site_round(*args: Any, **kwargs: Any) -> SiteResultLike:
    from corolla.federation.site.round import train_site_round  # torch, opacus: only when training

    return train_site_round(*args, **kwargs)
