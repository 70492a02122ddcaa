"""`TrainConfig`: the run's settings, as the coordinator sends them to every site."""

from __future__ import annotations

import pytest

from corolla.training.config import TrainConfig, TrainConfigError

BASE = {"model": "m", "out-dir": "o"}


def test_the_run_config_round_trips() -> None:
    config = TrainConfig(model="m", out_dir="o", lora_r=4, dp_epsilon=None, peers=("/ip4/1.2.3.4/tcp/1",))
    assert TrainConfig.from_run_config(config.to_run_config()) == config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lora-r", 8.0),  # a float where an int is meant: shapes would silently be (8.0, 128)
        ("rounds", True),
        ("steps-per-round", "3"),
        ("secure-agg", 1),
        ("model", 3),
        ("lora-alpha", "x"),
        ("dp-epsilon", "lots"),
        ("batch-size", 2.5),
    ],
)
def test_a_run_config_value_of_the_wrong_type_is_a_typed_error(field: str, value: object) -> None:
    with pytest.raises(TrainConfigError, match=field.replace("-", "[-_]")):
        TrainConfig.from_run_config({**BASE, field: value})  # type: ignore[dict-item]


def test_floats_accept_integers_but_not_booleans() -> None:
    assert TrainConfig(model="m", out_dir="o", lr=1).lr == 1
    with pytest.raises(TrainConfigError, match="lr=True is not a number"):
        TrainConfig(model="m", out_dir="o", lr=True)


def test_pretrained_size_models_get_settings_that_fit_their_cost() -> None:
    """`platform train` applies these where no flag is given: wide models only (SmolLM2 is 576)."""
    from corolla.training.config import PRETRAINED_DEFAULTS

    assert PRETRAINED_DEFAULTS.applies(576) and not PRETRAINED_DEFAULTS.applies(64)  # the tiny workspace model
    config = TrainConfig(model="m", out_dir="o", **PRETRAINED_DEFAULTS.settings())  # type: ignore[arg-type]
    assert (config.batch_size, config.steps_per_round, config.lora_r) == (24, 4, 4)
    assert config.targets == ("q_proj", "v_proj") and config.round_timeout == 1800.0
    assert TrainConfig.from_run_config(config.to_run_config()) == config
