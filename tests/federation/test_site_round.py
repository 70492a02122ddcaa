"""A site's round and the coordinator, in-process against in-process servers (the
Flower wiring around them is tested in test_flower_*; the whole run in e2e)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from corolla.federation.coordinator.model import Coordinator
from corolla.federation.outcomes import RunSummary
from corolla.federation.site.env import SiteEnv, SiteRefused
from corolla.federation.site.round import train_site_round
from corolla.inference.server import BlockServer
from corolla.training.clinical import synthetic_clinical
from corolla.training.config import TrainConfig
from corolla.training.data import DataError, write_jsonl
from corolla.training.plan import dp_plan
from corolla.training.privacy import recompute_epsilon
from corolla.training.privacy_ledger import PrivacyLedger


@pytest.fixture
def setup(tiny_llama: Path, start_server: Callable[..., BlockServer], tmp_path: Path):
    servers = [start_server(tiny_llama, span) for span in [(0, 2), (2, 4)]]
    data = synthetic_clinical(sites=1, records_per_site=64, test_records=16, seed=1)
    write_jsonl(data.sites[0], tmp_path / "site.jsonl")
    write_jsonl(data.test, tmp_path / "test.jsonl")
    config = TrainConfig(
        model=str(tiny_llama),
        out_dir=str(tmp_path / "out"),
        rounds=2,
        steps_per_round=3,
        batch_size=8,
        servers=tuple(s.endpoint for s in servers),
        test_data=str(tmp_path / "test.jsonl"),
        dp_epsilon=3.0,
    )
    env = SiteEnv(data=tmp_path / "site.jsonl", store=tmp_path / "store", workspace=None, node="site-a")
    return config, env


def test_rounds_charge_the_budget_and_refuse_past_it(setup) -> None:
    config, env = setup
    coordinator = Coordinator(config)
    weights = coordinator.initial_weights()
    for server_round in (1, 2):
        result = train_site_round(config, env, weights, server_round=server_round, run_key="run-1")
        assert result.update.keys() == weights.keys()
        assert any(np.abs(u).max() > 0 for u in result.update.values())
        weights = {k: weights[k] + result.update[k] for k in weights}
    plan = dp_plan(config, 64)
    assert plan is not None
    ledger = PrivacyLedger.open(env.store, "run-1", plan)
    spent = result.metrics.epsilon
    assert spent == ledger.spent() <= 3.0
    assert spent == recompute_epsilon([(plan.noise_multiplier, plan.sample_rate, 6)], plan.delta)
    assert spent > 2.9  # the plan uses the budget, it does not waste it
    with pytest.raises(SiteRefused, match="budget"):
        train_site_round(config, env, weights, server_round=3, run_key="run-1")
    assert ledger.spent() == spent  # the refused round charged nothing


def test_coordinator_scores_and_writes_a_peft_adapter(setup, tiny_llama: Path) -> None:
    config, env = setup
    coordinator = Coordinator(config)
    weights = coordinator.initial_weights()
    scores = coordinator.evaluate(weights)
    assert set(scores) == {"loss", "accuracy", "chance"} and math.isfinite(scores["loss"])
    result = train_site_round(config, env, weights, server_round=1, run_key="run-2")
    weights = {k: weights[k] + result.update[k] for k in weights}
    empty = RunSummary(
        config={},
        dp=True,
        aggregation="mean_update",
        secure_agg=False,
        rounds=[],
        sites={},
        refusals=[],
        failures=[],
        missing=[],
        final={},
        initial={},
    )
    adapter_dir = coordinator.save(weights, empty)
    summary = json.loads((Path(config.out_dir) / "summary.json").read_text())
    assert summary["adapter"] == str(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)  # plain PEFT loads it
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora and any(float(p.abs().max()) > 0 for p in lora.values())


def test_bad_site_data_is_a_clear_error(setup, tmp_path: Path) -> None:
    config, env = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    weights = Coordinator(config).initial_weights()
    with pytest.raises(DataError, match=r"bad.jsonl:2: "):
        train_site_round(
            config,
            SiteEnv(data=bad, store=env.store, workspace=None, node="x"),
            weights,
            server_round=1,
            run_key="run-3",
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no records"):
        train_site_round(
            config,
            SiteEnv(data=empty, store=env.store, workspace=None, node="x"),
            weights,
            server_round=1,
            run_key="run-3",
        )


def test_weights_of_the_wrong_shape_are_refused(setup) -> None:
    config, env = setup
    weights = Coordinator(config).initial_weights()
    name = next(iter(weights))
    weights[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(Exception, match="shape"):
        train_site_round(config, env, weights, server_round=1, run_key="run-4")


def test_a_site_cap_refuses_runs_that_ask_for_more_or_for_no_dp(setup) -> None:
    config, env = setup
    capped = SiteEnv(data=env.data, store=env.store, workspace=None, node="site-a", max_epsilon=1.0)
    weights = Coordinator(config).initial_weights()
    with pytest.raises(SiteRefused, match=r"at most epsilon 1\.0"):
        train_site_round(config, capped, weights, server_round=1, run_key="run-5")  # asks for 3
    no_dp = dataclasses.replace(config, dp_epsilon=None)
    with pytest.raises(SiteRefused, match="no DP"):
        train_site_round(no_dp, capped, weights, server_round=1, run_key="run-5")
    assert not (env.store / "privacy").exists() or not any((env.store / "privacy").glob("run-5*"))
