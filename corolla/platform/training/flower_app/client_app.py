"""The ClientApp of `platform train`: `handle_train` with the site's DP-SGD round."""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from corolla.platform.training.flower_app.client import SiteResultLike, handle_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    # `handle_train` imports `SiteEnv` and `SiteRefused` itself, so a failing import is an error reply.
    return handle_train(msg, context, _train_site_round)


def _train_site_round(*args: Any, **kwargs: Any) -> SiteResultLike:
    from corolla.platform.training.site import train_site_round  # torch, opacus: only when training

    return train_site_round(*args, **kwargs)
