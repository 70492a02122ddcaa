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
