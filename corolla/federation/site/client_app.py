"""The ClientApp of `platform train`: a site's DP-SGD round on a train message, and the
site's two secure-aggregation answers (its certificates; the unmask stage)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from corolla.federation.messages import UNMASK_ACTION
from corolla.federation.site.handlers import handle_keys_query, handle_train, handle_unmask

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    from corolla.federation.site.round import train_site_round  # torch, opacus: only when training

    return handle_train(msg, context, train_site_round)


@app.train(UNMASK_ACTION)
def unmask(msg: Message, context: Context) -> Message:
    return handle_unmask(msg, context)


@app.query()
def keys(msg: Message, context: Context) -> Message:
    return handle_keys_query(msg, context)
