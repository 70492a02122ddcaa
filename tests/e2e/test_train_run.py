"""`platform train` end to end: a local consortium of real processes (block servers, a
Flower SuperLink, three SuperNodes), a short DP run, and what it must leave behind:
per-site epsilon within the budget and equal to Opacus's recomputation from the logged
history, a PEFT adapter that plain PEFT loads, and the progress lines on screen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from corolla.platform.training.privacy import recompute_epsilon

pytestmark = pytest.mark.e2e


def test_platform_train_short_dp_run(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "corolla", "train", "--adapter", "lora", "--dp-epsilon", "2",
        "--model", str(tiny_llama), "--rounds", "2", "--steps-per-round", "3", "--batch-size", "16",
        "--workspace", str(tmp_path / "ws"), "--out", str(out), "--round-timeout", "240",
    ]  # fmt: skip
    env = dict(os.environ, COROLLA_WORKSPACE=str(tmp_path / "ws"))
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("before training: held-out loss") for line in lines)
    assert sum(line.startswith("round ") for line in lines) == 2

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["sites"]) == 3 and not summary["refusals"] and not summary["missing"]
    for name, site in summary["sites"].items():
        history = [h for h in site["history"] if h["status"] == "ok"]
        assert len(history) == 2, name
        sigma, q, delta = history[0]["noise_multiplier"], history[0]["sample_rate"], history[0]["delta"]
        steps = sum(int(h["steps"]) for h in history)
        recomputed = recompute_epsilon([(sigma, q, steps)], delta)
        assert site["epsilon"] == pytest.approx(recomputed, rel=1e-9), name
        assert 1.9 < site["epsilon"] <= 2.0, name  # the whole budget, not more
    assert summary["final"]["loss"] < summary["initial"]["loss"]

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, out / "adapter")
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(float(p.abs().max()) > 0 for p in trained)
    assert torch.isfinite(torch.cat([p.flatten() for p in trained])).all()
