"""`platform train` end to end: a local consortium of real processes (block servers, a
Flower SuperLink, three SuperNodes), a short DP run with secure aggregation, and what it
must leave behind: per-site epsilon within the budget and equal to Opacus's recomputation
from the logged history, a PEFT adapter that plain PEFT loads and that equals plain
aggregation of the sites' updates within the encoding's quantization error, and the
progress lines on screen."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from corolla.inference.client import LoraAdapter
from corolla.inference.models import Checkpoint
from corolla.secure_agg import FixedPoint
from corolla.training.config import TrainConfig
from corolla.training.plan import lora_settings
from corolla.training.privacy import recompute_epsilon

pytestmark = pytest.mark.e2e


def test_platform_train_short_dp_run(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "corolla", "train", "--adapter", "lora", "--dp-epsilon", "2",
        "--model", str(tiny_llama), "--rounds", "2", "--steps-per-round", "3", "--batch-size", "16",
        "--workspace", str(tmp_path / "ws"), "--out-dir", str(out), "--round-timeout", "240",
        "--keep-site-updates",  # each site keeps what it contributed, for the comparison below
    ]  # fmt: skip
    env = dict(os.environ, COROLLA_WORKSPACE=str(tmp_path / "ws"))
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("training: 2 rounds, DP-SGD, epsilon 2.0 per site, secure aggregation")
    assert any(line.startswith("before training: held-out loss") for line in lines)
    assert sum(re.match(r"round \d/2  held-out loss", line) is not None for line in lines) == 2
    # Watched as it goes (not a terminal here: plain lines): the rounds starting, the held-out
    # scoring and every site's last step of each round, read from the sites' own progress files.
    assert sum(line == "round 1/2: training on 3 sites ..." for line in lines) == 1
    assert "evaluating before training: 200/200 notes" in " ".join(lines)
    for site in ("site-0", "site-1", "site-2"):
        for server_round in (1, 2):
            assert any(line.startswith(f"{site} round {server_round}: step 3/3") for line in lines), site
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert {e["event"] for e in events} == {"start", "eval", "baseline", "round_start", "round", "done"}
    assert [e["round"] for e in events if e["event"] == "eval" and e["done"] == e["total"]] == [0, 1, 2]

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

    # Secure aggregation gave the plain mean of the sites' updates, within the encoding's quantum.
    checkpoint = Checkpoint.open(tiny_llama)
    config = TrainConfig(model=str(tiny_llama), out_dir=str(out))
    weights = {k: v.double() for k, v in LoraAdapter.init(checkpoint, lora_settings(config), seed=0).state().items()}
    stores = tmp_path / "ws" / "train-local" / "stores"
    for site in ("site-0", "site-1", "site-2"):  # each site's steps, in its own store
        steps = [json.loads(line) for line in (stores / site / "progress.jsonl").read_text().splitlines()]
        assert [(e["event"], e["site"], e["round"], e["step"]) for e in steps] == [
            ("step", site, r, k) for r in (1, 2) for k in (1, 2, 3)
        ]
    for server_round in (1, 2):
        kept = sorted(stores.glob(f"site-*/updates/flower-run-*/round-{server_round}.npz"))
        assert len(kept) == 3, kept
        updates = [np.load(path) for path in kept]
        for name in weights:
            weights[name] += torch.from_numpy(np.mean([u[name].astype(np.float64) for u in updates], axis=0))
    final = LoraAdapter.load_peft(out / "adapter", checkpoint).state()
    quantum = 2.0 ** -FixedPoint.for_sites(3, clip=config.secure_agg_clip).frac_bits
    for name, value in final.items():
        # per round: a mean of roundings to the quantum (<= q/2) plus float32 rounding of the weights
        torch.testing.assert_close(value.double(), weights[name], rtol=0, atol=2 * (quantum / 2) + 2e-6)
