"""A site's training plan, shared by the swarm run and the local reference: the LoRA
settings, the run's DP noise (fixed once from the budget over all rounds), Poisson batches,
and generators seeded from the operating system's CSPRNG (a seed known to anyone else would
let them subtract the noise)."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterator

import torch

from corolla.inference.client import LoraSettings
from corolla.training.config import TrainConfig
from corolla.training.data import EncodedBatch
from corolla.training.privacy import DpPlan, DpSettings, plan_noise

__all__ = ["dp_plan", "lora_settings", "poisson_batches", "secret_generator"]


def lora_settings(config: TrainConfig) -> LoraSettings:
    return LoraSettings(r=config.lora_r, alpha=config.lora_alpha, targets=config.targets)


@functools.lru_cache(maxsize=64)  # a search over noise multipliers (seconds): once per run and dataset size
def dp_plan(config: TrainConfig, n_records: int) -> DpPlan | None:
    """The run's noise, fixed once from the site's budget over all rounds; None without DP."""
    if config.dp_epsilon is None:
        return None
    settings = DpSettings(epsilon=config.dp_epsilon, delta=config.dp_delta, max_grad_norm=config.max_grad_norm)
    return plan_noise(
        settings, n_records=n_records, batch_size=config.batch_size, total_steps=config.rounds * config.steps_per_round
    )


def poisson_batches(
    data: EncodedBatch, *, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[EncodedBatch | None]:
    """`steps` Poisson draws (each record in with probability `sample_rate`), trimmed to
    their longest record; None for an empty draw."""
    n = data.input_ids.shape[0]
    for _ in range(steps):
        index = (torch.rand(n, generator=generator) < sample_rate).nonzero().squeeze(1)
        if len(index) == 0:
            yield None
            continue
        width = int(data.lengths[index].max())
        yield EncodedBatch(
            input_ids=data.input_ids[index, :width],
            loss_mask=data.loss_mask[index, :width],
            lengths=data.lengths[index],
        )


def secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))
