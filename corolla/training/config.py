"""The settings of one federated training run, and their form in Flower's run config.

`TrainConfig` is what `platform train` parses from its flags; the ServerApp and every
ClientApp rebuild the same object from Flower's run config (a flat map of hyphenated
keys to bool/int/float/str), so one run has one set of settings everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from corolla.errors import CorollaError

Exchange = Literal["per-sample", "flat"]
RunConfigValue = bool | int | float | str  # a value of Flower's run config (its `UserConfigValue`)
_EXCHANGES = ("per-sample", "flat")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScaleDefaults:
    """Settings `platform train` uses for a pretrained-size model where no flag gives them.

    TrainConfig's own defaults suit the tiny workspace model (a step costs milliseconds). On a
    model of `min_hidden` or wider a DP step costs ~4 forwards of the batch through every block
    (forward; the server's recompute and backward) on CPU: for SmolLM2-135M (hidden 576, 30
    blocks) on 2 cores about 1 s per record, so these keep `platform train --model <SmolLM2>
    --rounds 3` with 3 sites under 30 minutes (docs/training.md has the measured run)."""

    min_hidden: int = 256  # models at least this wide get these settings
    batch_size: int = 24  # expected batch: ~25 s of servers' CPU per step on SmolLM2
    steps_per_round: int = 4
    lora_r: int = 4  # a smaller adapter: DP noise grows with the square root of its size
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    round_timeout: float = 1800.0  # three sites' steps share the servers: a round takes minutes

    def applies(self, hidden_size: int) -> bool:
        return hidden_size >= self.min_hidden

    def settings(self) -> dict[str, int | float | tuple[str, ...]]:
        """The TrainConfig fields these set."""
        return {
            "batch_size": self.batch_size,
            "steps_per_round": self.steps_per_round,
            "lora_r": self.lora_r,
            "targets": self.targets,
            "round_timeout": self.round_timeout,
        }


PRETRAINED_DEFAULTS = ScaleDefaults()


class TrainConfigError(CorollaError):
    """A training setting is out of range or malformed."""

    exit_code = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    model: str  # local checkpoint directory (the base model, as clients and servers have it)
    out_dir: str  # where the coordinator writes the adapter, progress.jsonl and summary.json
    rounds: int = 5  # Flower rounds
    steps_per_round: int = 20  # DP-SGD optimizer steps each site takes per round
    batch_size: int = 128  # expected batch size; Poisson sampling with q = batch_size / N
    lr: float = 5e-3  # Adam learning rate of the site optimizers
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator (scaling = alpha / r)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names that get LoRA weights
    dp_epsilon: float | None = 3.0  # each site's total budget for the run; None = no DP (said loudly)
    dp_delta: float | None = None  # None = below 1/N of each site's records
    max_grad_norm: float = 1.0  # per-sample clipping bound
    exchange: Exchange = "flat"  # how servers hand DP-SGD what it needs: per-sample grads or flat clipping
    max_length: int = 192  # longest record, tokens
    seed: int = 0  # the initial adapter and the synthetic data; never DP sampling or noise (site CSPRNG)
    secure_agg: bool = True  # combine site updates by secure aggregation
    secure_agg_clip: float = 1.0  # secure aggregation encodes update values in [-clip, clip] (others are clipped)
    audit_rate: float = 0.05  # fraction of span computations spot-checked on another replica (0 = none)
    ledger: str = ""  # the coordinator's reputation ledger URL; "" = <workspace>/ledger/ledger.db
    ledger_key: str = ""  # the key that signs the ledger's head; "" = <workspace>/ledger/ledger.key
    tolerances: str = ""  # spot checks' tolerance table, a file on the coordinator's machine; "" = the shipped one
    round_timeout: float = 300.0  # seconds the coordinator waits for a round's replies
    sites: int = 0  # SuperNodes the first round waits for (up to round_timeout); 0 = start with whoever is online
    eval_records: int = 200  # held-out records scored after each round (0 = all)
    test_data: str = ""  # held-out JSONL the coordinator scores (on the coordinator's machine)
    peers: tuple[str, ...] = ()  # DHT multiaddrs of the swarm serving `model`
    servers: tuple[str, ...] = ()  # or fixed gRPC endpoints host:port (no DHT; tests, static setups)
    workspace: str = ""  # the coordinator's workspace (its node identity); "" = plaintext swarm (dev only)
    node: str = ""  # the coordinator's node name in `workspace`

    def __post_init__(self) -> None:
        # The run config arrives from the coordinator: every field is checked for its type first.
        for f in fields(self):
            value = getattr(self, f.name)
            kind = _FIELD_TYPES.get(f.name, "a string")
            if not _of_type(value, kind):
                raise TrainConfigError(f"{f.name}={value!r} is not {kind}")
        for name in ("rounds", "steps_per_round", "batch_size", "lora_r", "max_length"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("lr", "lora_alpha", "max_grad_norm", "round_timeout", "secure_agg_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise TrainConfigError(f"{name}={value} must be a positive number")
        if self.dp_epsilon is not None and not (math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0):
            raise TrainConfigError(f"dp_epsilon={self.dp_epsilon} must be a positive number (or off for no DP)")
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            raise TrainConfigError(f"dp_delta={self.dp_delta} must be in (0, 1)")
        if self.exchange not in _EXCHANGES:
            raise TrainConfigError(f"exchange={self.exchange!r} must be one of {', '.join(_EXCHANGES)}")
        if any("," in p for p in self.peers):
            raise TrainConfigError(f"peers={self.peers!r}: a multiaddr cannot contain a comma")
        if not self.targets or any(not t or not t.replace("_", "").replace(".", "").isalnum() for t in self.targets):
            raise TrainConfigError(f"targets={self.targets!r} must be module names such as q_proj,v_proj")
        if self.sites < 0:
            raise TrainConfigError(f"sites={self.sites} must be 0 (do not wait) or more")
        if not (math.isfinite(self.audit_rate) and 0 <= self.audit_rate <= 1):
            raise TrainConfigError(f"audit_rate={self.audit_rate} must be in [0, 1] (0 = no spot checks)")
        if self.eval_records < 0:
            raise TrainConfigError(f"eval_records={self.eval_records} must be 0 (all) or more")

    @property
    def dp(self) -> bool:
        return self.dp_epsilon is not None

    # -- Flower run config -------------------------------------------------------------------

    def to_run_config(self) -> dict[str, RunConfigValue]:
        """Flat hyphenated keys; None is written as "" (strings) or -1 (numbers), tuples comma-joined."""
        out: dict[str, RunConfigValue] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            key = f.name.replace("_", "-")
            if isinstance(value, tuple):
                value = ",".join(value)
            elif value is None:
                value = -1.0
            out[key] = value
        return out

    @classmethod
    def from_run_config(cls, config: Mapping[str, RunConfigValue]) -> TrainConfig:
        kwargs: dict[str, Any] = {}  # the Flower boundary: field values of mixed types; __post_init__ checks them
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                continue
            raw = config[key]
            value: RunConfigValue | tuple[str, ...] | None = raw
            try:
                if f.name in ("targets", "peers", "servers"):
                    value = tuple(t for t in str(raw).split(",") if t)
                elif f.name in ("dp_epsilon", "dp_delta"):
                    value = None if float(raw) < 0 else float(raw)
                elif f.name in _FLOATS:
                    value = float(raw)
            except (TypeError, ValueError):
                raise TrainConfigError(f"run config {key}={raw!r} is not a valid value for {f.name}") from None
            kwargs[f.name] = value
        missing = [k for k in ("model", "out_dir") if k not in kwargs]
        if missing:
            raise TrainConfigError(f"run config lacks {', '.join(m.replace('_', '-') for m in missing)}")
        return cls(**kwargs)


_FLOATS = ("lr", "lora_alpha", "max_grad_norm", "round_timeout", "secure_agg_clip", "audit_rate")
_INTS = ("rounds", "steps_per_round", "batch_size", "lora_r", "max_length", "seed", "sites", "eval_records")
_FIELD_TYPES: dict[str, str] = {
    **dict.fromkeys(_INTS, "an integer"),
    **dict.fromkeys(_FLOATS, "a number"),
    "dp_epsilon": "a number or None",
    "dp_delta": "a number or None",
    "secure_agg": "true or false",
    "targets": "a tuple of strings",
    "peers": "a tuple of strings",
    "servers": "a tuple of strings",
}


def _of_type(value: object, kind: str | None) -> bool:
    """Whether `value` is of the kind `_FIELD_TYPES` names (bool is not a number here); fields
    not in the table are strings."""
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in ("a number", "a number or None"):
        return (value is None and kind.endswith("None")) or (
            isinstance(value, int | float) and not isinstance(value, bool)
        )
    if kind == "true or false":
        return isinstance(value, bool)
    if kind == "a tuple of strings":
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)
