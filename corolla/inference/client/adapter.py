"""A LoRA adapter owned by the client: its weights, and the PEFT directory format.

The client holds every LoRA weight as an `nn.Parameter` named like the wire
(`3.self_attn.q_proj.lora_A`); servers get the weights of their span per optimizer
step. `save_peft` writes `adapter_config.json` (PEFT's `LoraConfig`) and
`adapter_model.safetensors` with PEFT's key names
(`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`), so plain
`peft.PeftModel.from_pretrained(base, DIR)` loads it; `load_peft` reads such a
directory back, from us or from PEFT.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from corolla.inference.errors import ModelLoadError
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.models.lora import match_targets
from corolla.inference.wire.adapters import adapter_hash, parse_name, tensor_name

if TYPE_CHECKING:
    from peft import LoraConfig

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraSettings:
    r: int = 8  # rank
    alpha: float = 16.0  # scaling = alpha / r, as PEFT
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # PEFT target_modules: module names, matched by suffix

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ModelLoadError(f"LoRA r={self.r} must be at least 1")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ModelLoadError(f"LoRA alpha={self.alpha} must be a positive number")
        if not self.targets:
            raise ModelLoadError("LoRA targets must name at least one module")
        object.__setattr__(self, "targets", tuple(sorted(set(self.targets))))  # PEFT keeps them as a set

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraAdapter(nn.Module):
    """LoRA weights for the blocks of one checkpoint. `params` is what an optimizer trains."""

    def __init__(self, checkpoint: Checkpoint, settings: LoraSettings, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.settings = settings
        self.scaling = settings.scaling
        # nn.ParameterDict keys may not contain dots
        self.params = nn.ParameterDict({_key(n): nn.Parameter(t.detach().clone().float()) for n, t in tensors.items()})
        self._names = {_key(n): n for n in tensors}

    @classmethod
    def init(cls, checkpoint: Checkpoint, settings: LoraSettings, *, seed: int = 0) -> LoraAdapter:
        """New weights as PEFT makes them: A Kaiming-uniform (a = sqrt(5)), B zero."""
        family, config = checkpoint.family, checkpoint.config
        modules = match_targets(family.lora_modules(), settings.targets)
        if not modules:
            raise ModelLoadError(
                f"LoRA targets {', '.join(settings.targets)} match no module of a {family.name} block; "
                f"its modules: {', '.join(family.lora_modules())}"
            )
        shapes = family.lora_shapes(config)
        generator = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for block in range(checkpoint.num_blocks):
            for module in modules:
                in_features, out_features = shapes[module]
                a = torch.empty(settings.r, in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                tensors[tensor_name(block, module, "lora_A")] = a
                tensors[tensor_name(block, module, "lora_B")] = torch.zeros(out_features, settings.r)
        return cls(checkpoint, settings, tensors)

    @staticmethod
    def shapes(checkpoint: Checkpoint, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
        """Wire name -> shape of every weight an adapter of `settings` has, without making one
        (what a site checks the coordinator's weights against before it spends anything)."""
        family = checkpoint.family
        modules = match_targets(family.lora_modules(), settings.targets)
        lora = family.lora_shapes(checkpoint.config)
        out: dict[str, tuple[int, ...]] = {}
        for block in range(checkpoint.num_blocks):
            for module in modules:
                in_features, out_features = lora[module]
                out[tensor_name(block, module, "lora_A")] = (settings.r, in_features)
                out[tensor_name(block, module, "lora_B")] = (out_features, settings.r)
        return out

    @classmethod
    def from_state(
        cls, checkpoint: Checkpoint, settings: LoraSettings, tensors: Mapping[str, torch.Tensor]
    ) -> LoraAdapter:
        """An adapter of `settings` holding `tensors`; names and shapes must be exactly its own."""
        adapter = cls.init(checkpoint, settings)
        adapter.load_state(tensors)
        return adapter

    # -- weights -----------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(wire name, parameter), in a fixed order."""
        for key, param in self.params.items():
            yield self._names[key], param

    def state(self) -> dict[str, torch.Tensor]:
        """Wire name -> a detached copy of the weight."""
        return {name: p.detach().clone() for name, p in self.named_weights()}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        mine = dict(self.named_weights())
        if set(tensors) != set(mine):
            missing, extra = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
            raise ModelLoadError(f"adapter weights differ in names: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if tensor.shape != mine[name].shape:
                    raise ModelLoadError(
                        f"adapter weight {name}: shape {tuple(tensor.shape)}, expected {tuple(mine[name].shape)}"
                    )
                mine[name].copy_(tensor)

    def span(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """The weights of blocks `[start, end)`, detached (what one server gets)."""
        return {n: p.detach() for n, p in self.named_weights() if start <= parse_name(n).block < end}

    def span_hash(self, start: int, end: int) -> str:
        return adapter_hash(self.span(start, end), self.scaling)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params.values())

    # -- the PEFT directory format -------------------------------------------------------------

    def peft_config(self, **extra: Any) -> LoraConfig:
        """PEFT's `LoraConfig` for these settings (no dropout, as the servers apply it)."""
        from peft import LoraConfig  # peft imports much; only its users pay for it

        return LoraConfig(
            r=self.settings.r,
            lora_alpha=self.settings.alpha,  # type: ignore[arg-type]  # PEFT annotates int; it divides, floats work
            target_modules=list(self.settings.targets),
            lora_dropout=0.0,
            bias="none",
            fan_in_fan_out=self.checkpoint.family.name == "gpt2",  # GPT-2 stores its projections as Conv1D
            **extra,
        )

    def peft_key(self, name: str) -> str:
        """PEFT's state-dict key (without the adapter name) of the weight `name`."""
        key = parse_name(name)
        prefix = self.checkpoint.family.block_key_prefixes(key.block)[0]
        return f"{_PEFT_PREFIX}{prefix}{key.module}.{key.part}.weight"

    def save_peft(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {self.peft_key(name): p.detach().contiguous().clone() for name, p in self.named_weights()}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = self.peft_config(task_type="CAUSAL_LM", base_model_name_or_path=str(self.checkpoint.path))
        config.save_pretrained(str(out))
        return out

    @classmethod
    def load_peft(cls, directory: str | Path, checkpoint: Checkpoint) -> LoraAdapter:
        root = Path(directory)
        config_path, weights_path = root / "adapter_config.json", root / "adapter_model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise ModelLoadError(f"{root} is not a PEFT adapter directory (adapter_config.json + safetensors)")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{config_path}: {exc}") from None
        if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
            raise ModelLoadError(f"{config_path}: only plain LoRA adapters are supported (no rsLoRA, no DoRA)")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ModelLoadError(f"{config_path}: per-module ranks or alphas are not supported")
        targets = config.get("target_modules") or []
        settings = LoraSettings(
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            targets=tuple([targets] if isinstance(targets, str) else targets),
        )
        blocks = {checkpoint.family.block_key_prefixes(i)[0]: i for i in range(checkpoint.num_blocks)}
        tensors: dict[str, torch.Tensor] = {}
        for key, tensor in load_file(str(weights_path)).items():
            name = key.removeprefix(_PEFT_PREFIX)
            prefix = next((p for p in blocks if name.startswith(p)), None)
            part = name.removesuffix(".weight").rsplit(".", 1)
            if prefix is None or len(part) != 2 or part[1] not in ("lora_A", "lora_B"):
                raise ModelLoadError(f"{weights_path}: unexpected tensor {key!r} for a {checkpoint.family.name} model")
            module = part[0].removeprefix(prefix)
            tensors[tensor_name(blocks[prefix], module, part[1])] = tensor
        return cls(checkpoint, settings, tensors)


def _key(name: str) -> str:
    return name.replace(".", "__")
