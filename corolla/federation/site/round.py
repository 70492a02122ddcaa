"""One site's round: DP-SGD on its own records, through the swarm, from the given weights.

The privacy budget is charged *before* training (a round that crashes half-way still
counts) in the site's own ledger, so neither a fresh ClientApp process nor the
coordinator can reset it. Poisson sampling and the DP noise draw from generators seeded
by the operating system's CSPRNG on the site: a seed known to anyone else (the run
config's `seed`, say) would let them subtract the noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from corolla.errors import CorollaError
from corolla.federation.audits import SiteAudits, SiteOrders
from corolla.inference.client import LoraAdapter, RemoteModelForCausalLM
from corolla.inference.security import TlsConfig
from corolla.training.config import TrainConfig
from corolla.training.data import DataError, encode, load_jsonl
from corolla.training.plan import dp_plan, lora_settings, poisson_batches, secret_generator
from corolla.training.privacy import BudgetExhaustedError, warn_dp_off
from corolla.training.privacy_ledger import PrivacyLedger
from corolla.training.swarm_trainer import SwarmTrainer

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class SiteEnv:
    """What a SuperNode's node config tells its ClientApp."""

    data: Path  # the site's training JSONL
    store: Path  # the site's private directory (privacy ledger)
    workspace: Path | None  # the site's workspace (node identity for mTLS to the swarm); None = plaintext
    node: str  # the site's node name in that workspace
    max_epsilon: float | None = None  # the site's own cap (node config `max-epsilon`): refuses more, or no DP


class SiteRefused(CorollaError):
    """The site declines this round (its privacy budget would be exceeded)."""

    exit_code = 11


@dataclass(frozen=True, slots=True)
class SiteResult:
    update: dict[str, np.ndarray]  # the site's new weights minus the given ones, float32
    metrics: dict[str, float | int | str]
    audit_events: tuple[str, ...] = ()  # the round's spot-check verdicts, canonical JSON (verification.py)


def train_site_round(
    config: TrainConfig,
    env: SiteEnv,
    weights: Mapping[str, np.ndarray],
    *,
    server_round: int,
    run_key: str,
    orders: SiteOrders | None = None,
) -> SiteResult:
    """One round of DP-SGD on the site's records through the swarm; with `orders`, a sample
    of the span computations is spot-checked on other replicas (verification.py)."""
    started = time.monotonic()
    if env.max_epsilon is not None and (config.dp_epsilon is None or config.dp_epsilon > env.max_epsilon):
        asked = "no DP" if config.dp_epsilon is None else f"epsilon {config.dp_epsilon}"
        raise SiteRefused(
            f"site {env.node or env.data.name}: the run asks for {asked}; this site allows at most "
            f"epsilon {env.max_epsilon} (its node config's max-epsilon)"
        )
    torch.set_num_threads(1)  # sites, servers and the coordinator share the machine's cores
    records = load_jsonl(env.data)
    n = len(records)
    plan = dp_plan(config, n)
    epsilon = math.nan
    if plan is None:
        warn_dp_off(log)
    else:
        ledger = PrivacyLedger.open(env.store, run_key, plan)
        try:
            epsilon = ledger.charge(config.steps_per_round)
        except BudgetExhaustedError as exc:
            raise SiteRefused(f"site {env.node or env.data.name}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    try:
        data = encode(records, tokenizer, max_length=config.max_length)
    except DataError as exc:
        raise DataError(f"{env.data}: {exc}") from None
    sample_rate = plan.sample_rate if plan is not None else min(1.0, config.batch_size / n)
    tls, reporter = None, env.node or env.data.stem
    if env.workspace is not None:
        from corolla.pki import NodeIdentity

        identity = NodeIdentity.load(env.workspace / "nodes" / env.node)
        tls, reporter = TlsConfig.for_node(identity), identity.node_id
    audits = SiteAudits(orders, reporter=reporter) if orders is not None and orders.rate > 0 else None
    start = {name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in weights.items()}
    with RemoteModelForCausalLM.from_pretrained(
        config.model,
        initial_peers=config.peers,
        servers=config.servers,
        tls=tls,
        spot_checker=audits.checker if audits is not None else None,
    ) as model:
        adapter = LoraAdapter.from_state(model.checkpoint, lora_settings(config), start)
        trainer = SwarmTrainer(
            model,
            adapter,
            lr=config.lr,
            exchange=config.exchange,
            noise_multiplier=plan.noise_multiplier if plan is not None else None,
            max_grad_norm=config.max_grad_norm,
            expected_batch_size=config.batch_size,
            generator=secret_generator(),
        )
        losses = [
            trainer.step(batch)
            for batch in poisson_batches(
                data, sample_rate=sample_rate, steps=config.steps_per_round, generator=secret_generator()
            )
        ]
        new = adapter.state()
        events = tuple(audits.finish()) if audits is not None else ()  # before the swarm connection closes
    update = {name: (new[name] - start[name]).numpy() for name in start}
    seen = [x for x in losses if not math.isnan(x)]
    metrics: dict[str, float | int | str] = {
        "site": env.node or env.data.stem,
        "round": server_round,
        "steps": config.steps_per_round,
        "seconds": time.monotonic() - started,
        "dp": int(plan is not None),
        "sample_rate": sample_rate,
    }
    if plan is None:  # under DP the training loss stays home: no accountant covers it
        metrics["loss"] = float(np.mean(seen)) if seen else math.nan
    else:
        metrics |= {"epsilon": epsilon, "noise_multiplier": plan.noise_multiplier, "delta": plan.delta}
    if audits is not None:
        metrics["audits"] = len(events)
    return SiteResult(update=update, metrics=metrics, audit_events=events)
