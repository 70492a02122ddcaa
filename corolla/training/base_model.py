"""The embedded default base model for `platform train`: a tiny Llama that has read notes.

A real consortium fine-tunes a pretrained model, whose features an adapter re-uses. A
tiny *random* model has none: LoRA through DP-SGD at epsilon 3 then barely leaves chance
on the clinical task (measured: 0.21 accuracy after 100 steps of batch 128, chance 0.125).
So the default base is the tiny Llama after a short language-model pretraining on
*unlabelled* synthetic notes: symptoms and findings only, never a diagnosis, drawn from
a seed no training or test split uses. It knows the vocabulary of notes, not the task
(its held-out accuracy before fine-tuning is chance); the same DP run then reaches
about 4x chance (0.51). Deterministic: the same seed gives the same weights.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.inference.models.tiny import TinySpec, init_tiny
from corolla.training.clinical import synthetic_clinical
from corolla.training.data import Record, encode

log = logging.getLogger(__name__)

PRETRAIN_SEED = 7919  # the notes' seed: no split of a run uses it (runs use --seed, default 0)
PRETRAIN_STEPS = 300
PRETRAIN_NOTES = 4000


def pretrain_on_notes(model_dir: Path, *, steps: int = PRETRAIN_STEPS, seed: int = PRETRAIN_SEED) -> None:
    """Full-model language modelling of unlabelled notes, in place (AdamW, batch 32)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and the same on every machine
    try:
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        notes = synthetic_clinical(sites=1, records_per_site=PRETRAIN_NOTES, test_records=0, seed=seed).sites[0]
        text = [Record(prompt="", completion=r.prompt.rsplit(" Diagnosis:", 1)[0]) for r in notes]
        data = encode(text, tokenizer, max_length=None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        started = time.monotonic()
        for step in range(steps):
            index = torch.randint(0, len(text), (32,), generator=generator)
            width = int(data.lengths[index].max())
            ids = data.input_ids[index, :width]
            labels = ids.masked_fill(torch.arange(width) >= data.lengths[index, None], -100)
            loss: torch.Tensor = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            if step % 100 == 0:
                log.info("pretraining the tiny base model: step %d/%d, loss %.3f", step, steps, loss.item())
        log.info("pretrained in %.1f s", time.monotonic() - started)
        model.save_pretrained(model_dir)
    finally:
        torch.set_num_threads(threads)


def default_training_model(workspace: Path) -> Path:
    """The workspace's tiny Llama pretrained on notes, made once (atomically, under a lock)."""
    target = workspace / "models" / "tiny-llama-notes"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".tiny-llama-notes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            print(
                f"making the default base model in {target} (tiny Llama, ~30 s of pretraining on notes) ...", flush=True
            )
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-llama-notes-"))
            try:
                init_tiny(staging, TinySpec(arch="llama"))
                pretrain_on_notes(staging)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target
