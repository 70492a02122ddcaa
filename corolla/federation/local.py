"""`platform train --local`: the same federated run in one process, without swarm or Flower.

Each site trains in turn on the whole model (Hugging Face + PEFT) with Opacus's own
`PrivacyEngine` (`LocalTrainer`), from the same starting adapter, with the same budget
rule, Poisson sampling and round structure as the federated run; the coordinator's
uniform mean of the updates makes the next round's adapter. This is the reference the
README puts beside the federated numbers, and it writes the same outputs
(`progress.jsonl`, `adapter/`, `summary.json`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from corolla.federation.coordinator.model import write_summary
from corolla.federation.progress import ProgressLog
from corolla.inference.client import LoraAdapter
from corolla.inference.models import Checkpoint
from corolla.training.config import TrainConfig
from corolla.training.data import encode, evaluate, load_jsonl
from corolla.training.local_trainer import LocalTrainer
from corolla.training.plan import dp_plan, lora_settings, poisson_batches, secret_generator
from corolla.training.privacy import BudgetExhaustedError, warn_dp_off
from corolla.training.privacy_ledger import PrivacyLedger

_LOG_NAME = "corolla.federation.local"


def run_local(config: TrainConfig, sites_data: list[Path], test_data: Path, *, echo: bool = True) -> dict[str, Any]:
    import logging

    log = logging.getLogger(_LOG_NAME)
    # one thread: with two, every op waits for the slower of them, and a busy second core
    # (measured here) made a round 20x slower
    torch.set_num_threads(1)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint.open(config.model)
    settings = lora_settings(config)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    adapter = LoraAdapter.init(checkpoint, settings, seed=config.seed)
    weights = adapter.state()
    test = load_jsonl(test_data)[: config.eval_records or None]
    labels = sorted({r.completion.strip() for r in test})
    names = [f"site-{i}" for i in range(len(sites_data))]
    site_sets = [load_jsonl(path) for path in sites_data]
    encoded = [encode(records, tokenizer, max_length=config.max_length) for records in site_sets]
    plans = [dp_plan(config, len(records)) for records in site_sets]
    if not config.dp:
        warn_dp_off(log)
    run_key = f"local-{int(time.time())}"
    ledgers = [
        PrivacyLedger.open(out / "local-store" / name, run_key, plan) if plan is not None else None
        for name, plan in zip(names, plans, strict=True)
    ]
    history: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    rounds: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []
    evaluation: dict[str, Any] = {}
    with ProgressLog.in_dir(out, echo=echo) as progress:
        progress.emit(
            {
                "event": "start",
                "rounds": config.rounds,
                "dp": config.dp,
                "dp_epsilon": config.dp_epsilon,
                "secure_agg": False,
                "aggregation": "mean_update (local)",
                "sites_expected": len(names),
            }
        )
        initial = _evaluate(config, checkpoint, weights, tokenizer, test, labels)
        progress.emit(
            {
                "event": "baseline",
                "round": 0,
                "rounds": config.rounds,
                "seconds": 0.0,
                "eval": initial,
                "dp": config.dp,
                "sites": {},
            }
        )
        for server_round in range(1, config.rounds + 1):
            started = time.monotonic()
            updates, outcomes = [], {}
            for name, data, plan, ledger in zip(names, encoded, plans, ledgers, strict=True):
                info: dict[str, Any] = {"status": "ok"}
                if ledger is not None:
                    try:
                        info["epsilon"] = ledger.charge(config.steps_per_round)
                    except BudgetExhaustedError as exc:
                        outcomes[name] = {"status": "refused", "reason": str(exc)}
                        refusals.append({"round": server_round, "site": name, "reason": str(exc)})
                        continue
                n = data.input_ids.shape[0]
                sample_rate = plan.sample_rate if plan is not None else min(1.0, config.batch_size / n)
                trainer = LocalTrainer(
                    config.model,
                    LoraAdapter.from_state(checkpoint, settings, weights),
                    lr=config.lr,
                    noise_multiplier=plan.noise_multiplier if plan is not None else None,
                    max_grad_norm=config.max_grad_norm,
                    expected_batch_size=config.batch_size,
                    generator=secret_generator(),
                )
                batches = poisson_batches(
                    data, sample_rate=sample_rate, steps=config.steps_per_round, generator=secret_generator()
                )
                losses = [x for x in (trainer.step(b) for b in batches) if not math.isnan(x)]
                new = trainer.adapter.state()
                updates.append({k: new[k] - weights[k] for k in weights})
                info |= {"loss": float(np.mean(losses)) if losses else math.nan, "sample_rate": sample_rate}
                if plan is not None:
                    info |= {
                        "noise_multiplier": plan.noise_multiplier,
                        "delta": plan.delta,
                        "steps": config.steps_per_round,
                    }
                outcomes[name] = info
                history[name].append({"round": server_round, **info})
            if updates:
                weights = {k: weights[k] + torch.stack([u[k] for u in updates]).mean(0) for k in weights}
            evaluation = _evaluate(config, checkpoint, weights, tokenizer, test, labels)
            record = {
                "round": server_round,
                "rounds": config.rounds,
                "seconds": round(time.monotonic() - started, 3),
                "nodes": len(names),
                "aggregated": len(updates),
                "kept": not updates,
                "eval": evaluation,
                "dp": config.dp,
                "sites": outcomes,
            }
            progress.emit({"event": "round", **record})
            rounds.append(record)
        adapter_dir = LoraAdapter.from_state(checkpoint, settings, weights).save_peft(out / "adapter")
        sites = {
            name: {
                "epsilon": ledger.spent() if ledger is not None else None,
                "rounds_trained": len(history[name]),
                "history": history[name],
            }
            for name, ledger in zip(names, ledgers, strict=True)
        }
        summary = {
            "mode": "local",
            "config": dataclasses.asdict(config),
            "dp": config.dp,
            "aggregation": "mean_update (local)",
            "secure_agg": False,
            "rounds": rounds,
            "sites": sites,
            "refusals": refusals,
            "failures": [],
            "missing": [],
            "final": evaluation,
            "adapter": str(adapter_dir),
        }
        path = write_summary(out, summary)
        progress.emit({"event": "done", "adapter": str(adapter_dir), "summary": str(path)})
    return summary


def _evaluate(config, checkpoint, weights, tokenizer, test, labels) -> dict[str, Any]:
    if not test:
        return {}
    model = LocalTrainer(
        config.model,
        LoraAdapter.from_state(checkpoint, lora_settings(config), weights),
        lr=1.0,
        noise_multiplier=None,
        max_grad_norm=1.0,
        expected_batch_size=1,
    )
    model.model.eval()
    return evaluate(model.logits, tokenizer, test, labels, batch_size=64, max_length=config.max_length)
