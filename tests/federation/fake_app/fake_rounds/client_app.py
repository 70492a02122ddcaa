"""ClientApp: `handle_train` with a fake site round.

Site `site-i` returns an update of all `i + 1`. Files in the site's store steer it:
`refuse-at` (a round number) makes it refuse that round, `sleep` makes it hang (to be
killed); it writes `round-<n>` with its run key when it starts a round.
"""

import time

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from corolla.errors import CorollaError
from corolla.federation.messages import UNMASK_ACTION, AuditOrders, Weights
from corolla.federation.outcomes import SiteMetrics
from corolla.federation.site.env import SiteEnv, SiteResult
from corolla.federation.site.handlers import handle_keys_query, handle_train, handle_unmask
from corolla.training.config import TrainConfig


class FakeRefused(CorollaError):
    pass


def fake_round(
    config: TrainConfig,
    env: SiteEnv,
    weights: Weights,
    *,
    server_round: int,
    run_key: str,
    orders: AuditOrders | None = None,
) -> SiteResult:
    (env.store / f"round-{server_round}").write_text(run_key, encoding="utf-8")
    if (env.store / "sleep").exists():
        time.sleep(600)
    refuse_at = env.store / "refuse-at"
    if refuse_at.exists() and int(refuse_at.read_text()) == server_round:
        raise FakeRefused("privacy budget exhausted (fake)")
    value = float(env.node.rsplit("-", 1)[1]) + 1
    update = {name: np.full(w.shape, value, dtype=np.float32) for name, w in weights.items()}
    return SiteResult(update=update, metrics=SiteMetrics(loss=1.0 / value, epsilon=0.5 * server_round))


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context, fake_round, refusals=(FakeRefused,))


@app.train(UNMASK_ACTION)
def unmask(msg: Message, context: Context) -> Message:
    return handle_unmask(msg, context)


@app.query()
def keys(msg: Message, context: Context) -> Message:
    return handle_keys_query(msg, context)
