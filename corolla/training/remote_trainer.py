"""DP-SGD on LoRA adapters whose blocks run in the swarm.

The client holds the adapter and the optimizer; the servers hold the frozen blocks.
One step: embed the batch, stream it forward through the chain (each server applying
the adapter for its span), compute each record's loss at home, and stream the
gradient back. What comes back for the adapter depends on the exchange:

- `per-sample`: every server returns each record's gradient of its adapter weights,
  `(B, *shape)`; they go to Opacus's `DPOptimizer` as `p.grad_sample`, which clips,
  sums, adds noise and steps exactly as with its own `GradSampleModule`.
- `flat` (flat clipping, the default): servers return each record's squared gradient
  norm over their weights (B floats); the client adds them up across servers, computes
  Opacus's clip factors `min(1, C / (norm + 1e-6))`, and asks each server for the clipped
  sum (adapter-sized). The optimizer then only adds noise and steps.

Both give the same update as Opacus on the whole model in one process (tests check
this). Without DP the same path runs with clip factors `1/B`: the plain mean gradient.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Literal

import torch
from opacus.optimizers import DPOptimizer

from corolla.inference.client import AdapterSync, LoraAdapter, RemoteModelForCausalLM
from corolla.inference.client.sequential import HopGrads
from corolla.inference.errors import RemoteError
from corolla.inference.wire.backward import AdapterGrads
from corolla.training.config import Exchange
from corolla.training.data import EncodedBatch

OptimizerName = Literal["adam", "sgd"]
# what `RemoteTrainer.bytes` counts: hidden states both ways, the adapter's gradients (or norms)
# from the servers, the clip factors sent to them, and the adapter weights put on them
PayloadKind = Literal["activations", "adapter_grads", "clip_factors", "adapter_put"]


def make_optimizer(name: OptimizerName, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer DP-SGD wraps: Adam by default; plain SGD makes a step linear in the gradient."""
    return torch.optim.SGD(params, lr=lr) if name == "sgd" else torch.optim.Adam(params, lr=lr)


class FlatClipDPOptimizer(DPOptimizer):  # type: ignore[misc]  # opacus is untyped (no py.typed)
    """A `DPOptimizer` whose clipped sums arrive ready (`p.summed_grad`, from the servers):
    it adds the noise, averages over the expected batch size and steps, as Opacus does."""

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        self.add_noise()
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad /= self.expected_batch_size
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True


def _check_complete(
    grads: dict[str, torch.Tensor], names: list[str], params: list[torch.nn.Parameter], *, batch: int | None
) -> None:
    """Every weight's gradient came back, in its shape (with a leading batch axis if `batch`)."""
    if set(grads) != set(names):
        missing, extra = sorted(set(names) - set(grads)), sorted(set(grads) - set(names))
        raise RemoteError(f"the servers' gradients do not match the adapter: missing {missing[:3]}, extra {extra[:3]}")
    for name, p in zip(names, params, strict=True):
        want = (batch, *p.shape) if batch is not None else tuple(p.shape)
        if tuple(grads[name].shape) != want or not torch.isfinite(grads[name]).all():
            raise RemoteError(f"gradient of {name}: shape {tuple(grads[name].shape)} (expected {want}) or not finite")


def _scored_loss(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, batch: EncodedBatch
) -> torch.Tensor:
    """(B,) `per_record_loss` with the head run only where a token is scored: a record's
    completion and EOS are a few of its T positions, and the head (hidden -> vocabulary) is a
    fifth of a small model's work per position (SmolLM2: 28M of 135M weights), forward and
    backward. Each position's logits are the same either way (the head works per position)."""
    mask = batch.loss_mask.to(hidden.device)  # (B, T)
    logits = head(hidden[mask])  # (n, V): the scored positions only, in row order
    following = torch.nn.functional.pad(batch.input_ids[:, 1:], (0, 1)).to(hidden.device)  # (B, T): next tokens
    picked = torch.nn.functional.log_softmax(logits.float(), dim=-1).gather(1, following[mask].unsqueeze(1))
    rows = mask.nonzero()[:, 0]  # (n,) the record of each scored position
    sums = torch.zeros(mask.shape[0], dtype=picked.dtype, device=hidden.device).index_add(0, rows, picked.squeeze(1))
    return -sums / mask.sum(dim=1)


class RemoteTrainer:
    """`step(batch)` = one optimizer step of the adapter, computed through the swarm."""

    def __init__(
        self,
        model: RemoteModelForCausalLM,
        adapter: LoraAdapter,
        *,
        lr: float,
        exchange: Exchange,
        noise_multiplier: float | None,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator | None = None,
        optimizer: OptimizerName = "adam",
    ) -> None:
        """`noise_multiplier` None = no DP (plain mean gradient, no clipping, no noise)."""
        self.model = model
        self.adapter = adapter
        self.exchange: Exchange = exchange
        self.dp = noise_multiplier is not None
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        # this trainer's own link to the servers: it is bound to the model at every step, so two
        # trainers sharing one model never run the servers with each other's weights
        self._sync = AdapterSync(adapter, model_id=model.swarm.model_id)
        self.params = [p for _, p in adapter.named_weights()]
        self.names = [n for n, _ in adapter.named_weights()]
        base = make_optimizer(optimizer, self.params, lr)
        self.optimizer: torch.optim.Optimizer = base
        if noise_multiplier is not None:
            cls = DPOptimizer if exchange == "per-sample" else FlatClipDPOptimizer
            self.optimizer = cls(
                base,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size,
                loss_reduction="mean",
                generator=generator,
            )
        self.bytes = Counter[PayloadKind]()  # payload bytes by kind, over all steps (benchmarks)

    def step(self, batch: EncodedBatch | None) -> float:
        """One optimizer step; `batch` None is an empty Poisson draw (DP still adds noise and
        steps: the accountant counted it). Returns the batch's mean loss (nan when empty)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.adapter, self.model.blocks.adapter = self.adapter, self._sync
        if batch is None or batch.input_ids.shape[0] == 0:
            if not self.dp:
                return math.nan
            for p in self.params:
                if self.exchange == "per-sample":
                    p.grad_sample = torch.zeros((0, *p.shape))  # type: ignore[attr-defined]  # Opacus's attribute
                else:
                    p.summed_grad = torch.zeros_like(p)  # type: ignore[attr-defined]
            self.optimizer.step()
            return math.nan
        losses, parts = self._forward_backward(batch)
        n = batch.input_ids.shape[0]
        if self.dp and self.exchange == "per-sample":
            grads: dict[str, torch.Tensor] = {}
            for part in parts:
                grads.update(part.result.per_sample)
            _check_complete(grads, self.names, self.params, batch=n)
            self.bytes["adapter_grads"] += sum(g.nbytes for g in grads.values())
            for name, p in zip(self.names, self.params, strict=True):
                p.grad_sample = grads[name]  # type: ignore[attr-defined]
        else:
            norms = torch.zeros(n)
            for part in parts:
                if part.result.squared_norms is not None:
                    norms += part.result.squared_norms
                    self.bytes["adapter_grads"] += part.result.squared_norms.nbytes
            if self.dp:  # Opacus's clip factor, from the norms over all servers' weights
                factors = (self.max_grad_norm / (norms.sqrt() + 1e-6)).clamp(max=1.0)
            else:
                factors = torch.full((n,), 1.0 / n)
            sums = self.model.blocks.clip_sums(parts, factors)
            _check_complete(sums, self.names, self.params, batch=None)
            self.bytes["clip_factors"] += factors.nbytes * len(parts)
            self.bytes["adapter_grads"] += sum(g.nbytes for g in sums.values())
            for name, p in zip(self.names, self.params, strict=True):
                grad = sums[name]
                if self.dp:
                    p.summed_grad = grad  # type: ignore[attr-defined]
                else:
                    p.grad = grad
        self.optimizer.step()
        self.bytes["adapter_put"] = self._sync.bytes_put
        return float(losses.mean())

    def _forward_backward(self, batch: EncodedBatch) -> tuple[torch.Tensor, list[HopGrads]]:
        blocks = self.model.blocks
        ids = batch.input_ids
        hidden = self.model.client_parts.embed(ids)
        out, trace = blocks.forward_with_trace(hidden, 0, self.model.num_blocks)
        out = out.detach().requires_grad_(True)
        losses = _scored_loss(self.model.client_parts.head, out, batch)  # (B,)
        (grad,) = torch.autograd.grad(losses.sum(), out)  # each record's own loss gradient
        mode = AdapterGrads.PER_SAMPLE if self.dp and self.exchange == "per-sample" else AdapterGrads.NORMS
        _, parts = blocks.backward_through(trace, grad, adapter_grads=mode, step_id=uuid.uuid4().hex, grad_input=False)
        wire = self.model.wire_dtype  # forward hidden states may travel narrower; backward is full width
        forward_bytes = hidden.numel() * (torch.empty((), dtype=wire).element_size() if wire else hidden.element_size())
        activations = forward_bytes * (2 * len(trace))  # forward in + out per hop
        activations += sum(p.hidden.nbytes + p.grad_output.nbytes for p in parts)  # backward in
        activations += hidden.nbytes * max(len(parts) - 1, 0)  # input gradients back, all but the first hop
        self.bytes["activations"] += activations
        return losses.detach(), parts
