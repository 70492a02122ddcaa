"""The reference: the same LoRA adapter trained on the whole model in one process.

`--in-process` mode and the tests' yardstick. The model is the Hugging Face checkpoint with
PEFT's LoRA, and DP-SGD is Opacus's own: `PrivacyEngine.make_private` wraps it in a
`GradSampleModule` and the optimizer in a `DPOptimizer`. Batches come from the same
Poisson sampler as the swarm path (q = B / N, expected batch B), so one step here and
one through the swarm see the same records and, without noise, give the same update.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from opacus import PrivacyEngine
from peft import get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from corolla.inference.client import LoraAdapter
from corolla.training.data import EncodedBatch, per_record_loss
from corolla.training.remote_trainer import OptimizerName, make_optimizer


class LocalTrainer:
    def __init__(
        self,
        model_dir: str | Path,
        adapter: LoraAdapter,
        *,
        lr: float,
        noise_multiplier: float | None,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator | None = None,
        optimizer: OptimizerName = "adam",
    ) -> None:
        """`adapter` gives the starting weights (and is kept in sync after each step)."""
        self.adapter = adapter
        self.dp = noise_multiplier is not None
        base = AutoModelForCausalLM.from_pretrained(str(model_dir))
        for module in base.modules():  # the swarm never drops out; neither does the reference
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model = get_peft_model(base, adapter.peft_config())
        by_peft_name = dict(model.named_parameters())
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (ours, PEFT's), our order
        with torch.no_grad():
            for name, ours in adapter.named_weights():
                theirs = by_peft_name[adapter.peft_key(name).replace(".weight", ".default.weight")]
                theirs.copy_(ours)
                self._pairs.append((ours, theirs))
        model.train()
        params = [theirs for _, theirs in self._pairs]  # the same order as the swarm's optimizer
        base_optimizer = make_optimizer(optimizer, params, lr)
        self.model: torch.nn.Module = model
        self.optimizer: torch.optim.Optimizer = base_optimizer
        if noise_multiplier is not None:
            # make_private wants a data loader; batches come from our sampler instead (see module doc)
            placeholder = DataLoader(TensorDataset(torch.zeros(expected_batch_size, 1)), batch_size=expected_batch_size)
            engine = PrivacyEngine(accountant="rdp")
            self.model, self.optimizer, _ = engine.make_private(
                module=model,
                optimizer=base_optimizer,
                data_loader=placeholder,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=False,
                loss_reduction="mean",
                noise_generator=generator,
            )
            self.optimizer.expected_batch_size = expected_batch_size  # type: ignore[attr-defined]

    def step(self, batch: EncodedBatch | None) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if batch is None or batch.input_ids.shape[0] == 0:
            if not self.dp:
                return math.nan
            for _, p in self._pairs:
                p.grad_sample = torch.zeros((0, *p.shape))  # type: ignore[attr-defined]  # Opacus's attribute
            self.optimizer.step()
            self._sync()
            return math.nan
        logits: torch.Tensor = self.model(input_ids=batch.input_ids).logits  # (B, T, V)
        losses = per_record_loss(logits, batch)
        torch.autograd.backward(losses.mean())
        self.optimizer.step()
        self._sync()
        return float(losses.detach().mean())

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits of the whole model with the current adapter, without gradients."""
        with torch.no_grad():
            logits: torch.Tensor = self.model(input_ids=input_ids).logits
        return logits

    def _sync(self) -> None:
        with torch.no_grad():
            for ours, theirs in self._pairs:
                ours.copy_(theirs)
