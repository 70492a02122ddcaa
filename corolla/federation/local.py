"""`platform train --in-process`: the reference run, in one process, without the swarm.

The same round loop as the federated run (`coordinator.rounds.run_rounds`) drives sites
that train in this process (`InProcessGrid`): each site's train message goes through the
same checks (`site.handlers.handle_train`), the same budget rule and privacy ledger
(`site.round.prepare_round`), and replies with the same records; the coordinator takes the
same uniform mean and writes the same `progress.jsonl`, `adapter/` and `summary.json`. What
differs is the computation: each site trains on the whole model (Hugging Face + PEFT) with
Opacus's own `PrivacyEngine` (`LocalTrainer`), and the held-out scoring runs locally. The
updates travel in the clear (there is no one to hide them from).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from transformers import AutoTokenizer

from corolla.federation.coordinator.model import write_summary
from corolla.federation.coordinator.rounds import run_rounds
from corolla.federation.grid import InProcessGrid, InProcessSite
from corolla.federation.messages import SITE_FAILED, AuditOrders, RecordError, Weights, site_error
from corolla.federation.outcomes import RunSummary, StepEvent
from corolla.federation.progress import ProgressLog
from corolla.federation.site.env import SiteEnv, SiteResult
from corolla.federation.site.handlers import handle_train, site_name
from corolla.federation.site.round import charge_round, prepare_round, run_steps
from corolla.inference.client import LoraAdapter
from corolla.inference.models import Checkpoint
from corolla.training.config import TrainConfig
from corolla.training.data import Record, load_jsonl
from corolla.training.local_trainer import LocalTrainer
from corolla.training.plan import lora_settings, secret_generator
from corolla.training.scoring import ScoreProgress, evaluate_shared, hf_prefix_model

__all__ = ["run_local"]


def run_local(config: TrainConfig, sites_data: list[Path], test_data: Path, *, echo: bool = True) -> RunSummary:
    """The run with `sites_data[i]` as site i's records, scored on `test_data`."""
    # one thread: with two, every op waits for the slower of them, and a busy second core
    # (measured here) made a round 20x slower
    torch.set_num_threads(1)
    config = dataclasses.replace(config, secure_agg=False, audit_rate=0.0, test_data=str(test_data))
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = int(time.time())  # a fresh run key per run, as Flower gives each run its own
    steps = _StepEvents()
    sites = {
        index + 1: InProcessSite(
            context=Context(
                run_id=run_id,
                node_id=index + 1,
                node_config={
                    "data": str(path),
                    "store": str(out / "local-store" / f"site-{index}"),
                    "workspace": "",
                    "node": f"site-{index}",
                    "allow-plain-updates": True,
                },
                state=RecordDict(),
                run_config=config.to_run_config(),
            ),
            handle=lambda msg, context: _handle(msg, context, steps),
        )
        for index, path in enumerate(sites_data)
    }
    grid = InProcessGrid(sites, run_id=run_id)
    config = dataclasses.replace(config, sites=len(sites))
    with ProgressLog.in_dir(out, echo=echo, run_log=False) as progress:  # the user reads this process's output
        steps.log = progress  # the sites' step events go to the same file and screen
        return run_rounds(grid, config, LocalCoordinator(config), progress=progress, mode="local")


class _StepEvents:
    """Where the in-process sites report their steps: the run's own progress log."""

    log: ProgressLog | None = None

    def reporter(self, site: str, server_round: int, steps: int) -> Callable[[int], None]:
        started = time.monotonic()

        def report(done: int) -> None:
            if self.log is not None:
                seconds = round(time.monotonic() - started, 3)
                self.log.emit(StepEvent(site=site, round=server_round, step=done, steps=steps, seconds=seconds))

        return report


def _handle(msg: Message, context: Context, steps: _StepEvents) -> Message:
    if msg.metadata.message_type != "train":
        error = RecordError(f"a local site answers train messages only, not {msg.metadata.message_type!r}")
        return Message(site_error(SITE_FAILED, site=site_name(context), exc=error), reply_to=msg)
    # a failing site fails the run
    return handle_train(msg, context, functools.partial(local_site_round, steps=steps), propagate=True)


def local_site_round(
    config: TrainConfig,
    env: SiteEnv,
    weights: Weights,
    *,
    server_round: int,
    run_key: str,
    orders: AuditOrders | None,
    steps: _StepEvents | None = None,
) -> SiteResult:
    """A site's round on the whole model in this process, with Opacus's `PrivacyEngine`."""
    started = time.monotonic()
    prepared = prepare_round(config, env, weights, run_key=run_key)
    plan = prepared.plan
    checkpoint = Checkpoint.open(config.model)
    trainer = LocalTrainer(
        config.model,
        LoraAdapter.from_state(checkpoint, lora_settings(config), prepared.start),
        lr=config.lr,
        noise_multiplier=plan.noise_multiplier if plan is not None else None,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=config.batch_size,
        generator=secret_generator(),
    )
    epsilon = charge_round(config, env, prepared, run_key=run_key)
    update, metrics = run_steps(
        trainer.step,
        trainer.adapter,
        config,
        prepared,
        epsilon=epsilon,
        server_round=server_round,
        started=started,
        progress=steps.reporter(env.name, server_round, config.steps_per_round) if steps is not None else None,
    )
    return SiteResult(update=update, metrics=metrics, audit_events=() if orders is not None else None)


class LocalCoordinator:
    """The model side of the local run: the starting adapter, held-out scoring on the whole
    model in this process, the result."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.checkpoint = Checkpoint.open(config.model)
        self.settings = lora_settings(config)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        test: list[Record] = load_jsonl(Path(config.test_data)) if config.test_data else []
        self.test = test[: config.eval_records or None]
        self.labels = sorted({r.completion.strip() for r in self.test})

    def _adapter(self, weights: Weights) -> LoraAdapter:
        tensors = {name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in weights.items()}
        return LoraAdapter.from_state(self.checkpoint, self.settings, tensors)

    def initial_weights(self) -> Weights:
        adapter = LoraAdapter.init(self.checkpoint, self.settings, seed=self.config.seed)
        return {name: t.numpy() for name, t in adapter.state().items()}

    def evaluate(self, weights: Weights, progress: ScoreProgress | None = None) -> Mapping[str, float]:
        """Held-out scores on the whole model here: each batch of prompts once, every label
        continuing from its cache (`training.scoring`)."""
        if not self.test:
            return {}
        model = LocalTrainer(
            self.config.model,
            self._adapter(weights),
            lr=1.0,
            noise_multiplier=None,
            max_grad_norm=1.0,
            expected_batch_size=1,
        )
        model.model.eval()
        return evaluate_shared(
            hf_prefix_model(model.model),
            self.tokenizer,
            self.test,
            self.labels,
            batch_size=64,
            max_length=self.config.max_length,
            progress=progress,
        )

    def save(self, weights: Weights, summary: RunSummary) -> Path:
        out = Path(self.config.out_dir)
        adapter_dir = self._adapter(weights).save_peft(out / "adapter")
        write_summary(out, summary.model_copy(update={"adapter": str(adapter_dir)}))
        return adapter_dir
