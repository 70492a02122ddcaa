"""The coordinator's side of a run: the starting adapter, held-out scoring, the result.

The round loop (`rounds.py`) owns the rounds; this owns the model: it
makes the adapter every site starts from, scores each round's aggregate on the
held-out records through the swarm (the coordinator is a client of the swarm too),
and writes the final adapter in PEFT's format with the run summary beside it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from corolla.federation.messages import Weights
from corolla.federation.outcomes import RunSummary
from corolla.inference.client import LoraAdapter, RemoteModelForCausalLM, WorkAuditor
from corolla.inference.models import Checkpoint
from corolla.inference.security import TlsConfig
from corolla.pki import NodeIdentity
from corolla.training.config import TrainConfig
from corolla.training.data import Record, load_jsonl
from corolla.training.plan import lora_settings
from corolla.training.scoring import ScoreProgress, remote_prefix_model, score_labels

log = logging.getLogger(__name__)

MAX_LABELS = 32  # a held-out set with more distinct completions is scored by loss only
EVAL_BATCH = 64  # held-out prompts run together (of one length: see training.scoring)
EVAL_WORKERS = 2  # batches in flight at once: the chain's servers work on two at a time


class Coordinator:
    def __init__(self, config: TrainConfig, *, spot_checker: WorkAuditor | None = None) -> None:
        """`spot_checker` (a `corolla.verify.SpotChecker`) audits the held-out scoring through
        the swarm and keeps quarantined servers out of its routes."""
        self.config = config
        self.spot_checker = spot_checker
        self.checkpoint = Checkpoint.open(config.model)
        self.settings = lora_settings(config)
        self.test: list[Record] = load_jsonl(config.test_data) if config.test_data else []
        if config.eval_records:
            self.test = self.test[: config.eval_records]
        labels = sorted({r.completion.strip() for r in self.test})
        self.labels = labels if 1 < len(labels) <= MAX_LABELS else []
        self._model: RemoteModelForCausalLM | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def initial_weights(self) -> Weights:
        adapter = LoraAdapter.init(self.checkpoint, self.settings, seed=self.config.seed)
        return {name: t.numpy() for name, t in adapter.state().items()}

    def adapter(self, weights: Mapping[str, np.ndarray]) -> LoraAdapter:
        tensors = {name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in weights.items()}
        return LoraAdapter.from_state(self.checkpoint, self.settings, tensors)

    def evaluate(self, weights: Weights, progress: ScoreProgress | None = None) -> Mapping[str, float]:
        """Held-out loss (and label accuracy, chance) of the adapter, through the swarm: each
        batch of prompts runs once in an inference session, and every label continues from its
        cache (`training.scoring`); `progress(done, total)` after each batch."""
        if not self.test:
            return {}
        model = self._remote()
        model.use_adapter(self.adapter(weights))
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        scores = score_labels(
            remote_prefix_model(model),
            self._tokenizer,
            self.test,
            self.labels,
            batch_size=EVAL_BATCH,
            max_length=self.config.max_length,
            progress=progress,
            workers=EVAL_WORKERS,
        )
        return scores.evaluation().as_dict() if self.labels else {"loss": float(scores.losses.mean())}

    def save(self, weights: Weights, summary: RunSummary) -> Path:
        out = Path(self.config.out_dir)
        adapter_dir = self.adapter(weights).save_peft(out / "adapter")
        write_summary(out, summary.model_copy(update={"adapter": str(adapter_dir)}))
        if self._model is not None:
            self._model.close()
            self._model = None
        return adapter_dir

    def _remote(self) -> RemoteModelForCausalLM:
        if self._model is None:
            tls = None
            if self.config.workspace:
                node_dir = Path(self.config.workspace) / "nodes" / self.config.node
                tls = TlsConfig.for_node(NodeIdentity.load(node_dir))
            self._model = RemoteModelForCausalLM.from_pretrained(
                self.config.model,
                initial_peers=self.config.peers,
                servers=self.config.servers,
                tls=tls,
                spot_checker=self.spot_checker,
            )
        return self._model


def write_summary(out_dir: Path, summary: RunSummary) -> Path:
    """`<out_dir>/summary.json`, written atomically."""
    path, tmp = out_dir / "summary.json", out_dir / "summary.json.tmp"
    data = json.loads(summary.model_dump_json(exclude_none=True))
    for site in data["sites"].values():
        site.setdefault("epsilon", None)  # said, not left out: a site without DP, or that never reported
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
