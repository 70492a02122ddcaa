"""One site's round: DP-SGD on its own records, through the swarm, from the given weights.

Everything the round depends on is checked before the privacy budget is charged: the
site's cap, its records (read and tokenized), and the coordinator's weights against the
model's adapter (names, shapes; float32 and finite values were checked when the message
was read). Then the budget is charged *before* training (a round that crashes half-way
still counts) in the site's own ledger, so neither a fresh ClientApp process nor the
coordinator can reset it. Poisson sampling and the DP noise draw from generators seeded
by the operating system's CSPRNG on the site: a seed known to anyone else (the run
config's `seed`, say) would let them subtract the noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoTokenizer

from corolla.federation.messages import AuditOrders, RecordError, Weights, check_like
from corolla.federation.outcomes import SiteMetrics
from corolla.federation.progress import SiteProgress
from corolla.federation.site.audits import SiteAudits
from corolla.federation.site.env import SiteEnv, SiteRefused, SiteResult
from corolla.inference.client import LoraAdapter, RemoteModelForCausalLM
from corolla.inference.models import Checkpoint
from corolla.inference.security import TlsConfig
from corolla.training.config import TrainConfig
from corolla.training.data import DataError, EncodedBatch, encode, load_jsonl
from corolla.training.plan import dp_plan, lora_settings, poisson_batches, secret_generator
from corolla.training.privacy import BudgetExhaustedError, DpPlan, warn_dp_off
from corolla.training.privacy_ledger import PrivacyLedger
from corolla.training.remote_trainer import RemoteTrainer

__all__ = ["PreparedRound", "charge_round", "prepare_round", "run_steps", "train_site_round"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class PreparedRound:
    """A round that passed every check, not yet charged: what training needs."""

    data: EncodedBatch  # the site's records, tokenized
    plan: DpPlan | None  # the run's noise; None without DP
    sample_rate: float
    start: dict[str, torch.Tensor]  # the coordinator's weights as tensors


def prepare_round(
    config: TrainConfig, env: SiteEnv, weights: Mapping[str, np.ndarray], *, run_key: str
) -> PreparedRound:
    """Check the round before anything is charged: the site's cap, the coordinator's weights
    against the model's adapter, the site's records. Its privacy cost is charged later
    (`charge_round`), once the trainer is built: nothing is charged for
    a round the site could not train."""
    if env.max_epsilon is not None and (config.dp_epsilon is None or config.dp_epsilon > env.max_epsilon):
        asked = "no DP" if config.dp_epsilon is None else f"epsilon {config.dp_epsilon}"
        raise SiteRefused(
            f"site {env.name}: the run asks for {asked}; this site allows at most "
            f"epsilon {env.max_epsilon} (its node config's max-epsilon)"
        )
    expected = LoraAdapter.shapes(Checkpoint.open(config.model), lora_settings(config))
    try:
        check_like(weights, expected)
    except RecordError as exc:
        raise RecordError(f"the coordinator's weights are not this model's adapter: {exc}") from None
    records = load_jsonl(env.data)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    try:
        data = encode(records, tokenizer, max_length=config.max_length)
    except DataError as exc:
        raise DataError(f"{env.data}: {exc}") from None
    n = len(records)
    plan = dp_plan(config, n)
    if plan is None:
        warn_dp_off(log)
    return PreparedRound(
        data=data,
        plan=plan,
        sample_rate=plan.sample_rate if plan is not None else min(1.0, config.batch_size / n),
        start={name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in weights.items()},
    )


def charge_round(config: TrainConfig, env: SiteEnv, prepared: PreparedRound, *, run_key: str) -> float:
    """Charge the round's steps to the site's privacy ledger, before the first step (a round
    that crashes half-way still counts); the site's spending on this run after it (NaN
    without DP). `SiteRefused` when the budget would be exceeded."""
    if prepared.plan is None:
        return math.nan
    ledger = PrivacyLedger.open(env.store, run_key, prepared.plan)
    try:
        return ledger.charge(config.steps_per_round)
    except BudgetExhaustedError as exc:
        raise SiteRefused(f"site {env.name}: {exc}") from exc


def run_steps(
    step: Callable[[EncodedBatch | None], float],
    adapter: LoraAdapter,
    config: TrainConfig,
    prepared: PreparedRound,
    *,
    epsilon: float,
    server_round: int,
    started: float,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], SiteMetrics]:
    """The round's steps on Poisson batches; the update (new weights minus the given ones) and
    what the site reports. Under DP its training loss stays home: no accountant covers it.
    `progress(k)` is called after the k-th step (it says how far, never a loss)."""
    batches = poisson_batches(
        prepared.data, sample_rate=prepared.sample_rate, steps=config.steps_per_round, generator=secret_generator()
    )
    seen: list[float] = []
    for done, batch in enumerate(batches, start=1):
        loss = step(batch)
        if not math.isnan(loss):
            seen.append(loss)
        if progress is not None:
            progress(done)
    new = adapter.state()
    update = {name: (new[name] - prepared.start[name]).numpy() for name in prepared.start}
    plan = prepared.plan
    metrics = SiteMetrics(
        round=server_round,
        steps=config.steps_per_round,
        seconds=time.monotonic() - started,
        dp=int(plan is not None),
        sample_rate=prepared.sample_rate,
        loss=(float(np.mean(seen)) if seen else None) if plan is None else None,
        epsilon=epsilon if plan is not None else None,
        noise_multiplier=plan.noise_multiplier if plan is not None else None,
        delta=plan.delta if plan is not None else None,
    )
    return update, metrics


def train_site_round(
    config: TrainConfig,
    env: SiteEnv,
    weights: Weights,
    *,
    server_round: int,
    run_key: str,
    orders: AuditOrders | None = None,
) -> SiteResult:
    """One round of DP-SGD on the site's records through the swarm; with `orders`, a sample
    of the span computations is spot-checked on other replicas (`site.audits`)."""
    started = time.monotonic()
    torch.set_num_threads(1)  # sites, servers and the coordinator share the machine's cores
    prepared = prepare_round(config, env, weights, run_key=run_key)
    tls, reporter = None, env.name
    if env.identity is not None:
        tls, reporter = TlsConfig.for_node(env.identity), env.identity.node_id
    audits = SiteAudits(orders, reporter=reporter) if orders is not None and orders.rate > 0 else None
    with RemoteModelForCausalLM.from_pretrained(
        config.model,
        initial_peers=config.peers,
        servers=config.servers,
        tls=tls,
        spot_checker=audits.checker if audits is not None else None,
    ) as model:
        adapter = LoraAdapter.from_state(model.checkpoint, lora_settings(config), prepared.start)
        plan = prepared.plan
        trainer = RemoteTrainer(
            model,
            adapter,
            lr=config.lr,
            exchange=config.exchange,
            noise_multiplier=plan.noise_multiplier if plan is not None else None,
            max_grad_norm=config.max_grad_norm,
            expected_batch_size=config.batch_size,
            generator=secret_generator(),
        )
        epsilon = charge_round(config, env, prepared, run_key=run_key)  # the trainer is built
        steps = SiteProgress(
            env.store, site=env.name, server_round=server_round, steps=config.steps_per_round, clock=time.monotonic
        )
        try:
            update, metrics = run_steps(
                trainer.step,
                adapter,
                config,
                prepared,
                epsilon=epsilon,
                server_round=server_round,
                started=started,
                progress=steps.step,
            )
        finally:
            steps.close()
        events = audits.finish() if audits is not None else None  # before the swarm connection closes
    if events is not None:
        metrics = metrics.model_copy(update={"audits": len(events)})
    return SiteResult(update=update, metrics=metrics, audit_events=(events or ()) if orders is not None else None)
