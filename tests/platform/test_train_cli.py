"""`platform train`: its flags, its errors, and which runner it calls (the runners are fakes)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from corolla.platform.cli import main
from corolla.platform.launch import train_run as launcher
from corolla.platform.workspace import default_model
from corolla.training.config import TrainConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_model(tmp_path_factory.mktemp("ws"))


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Captures what the local consortium would run, instead of starting it."""
    calls: list[dict[str, Any]] = []

    class FakeRun:
        def __init__(self, config: TrainConfig, **kwargs: Any) -> None:
            calls.append({"config": config, **kwargs})

        def run(self) -> dict[str, Any]:
            return {"adapter": "/out/adapter", "final": {"loss": 0.5, "accuracy": 0.75}}

    monkeypatch.setattr(launcher, "LocalConsortiumRun", FakeRun)
    return calls


def _train(tmp_path: Path, *args: str) -> int:
    return main(["train", "--workspace", str(tmp_path / "ws"), *args])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "dora"], "invalid choice: 'dora'"),
        (["--dp-epsilon", "0"], "epsilon must be a positive number (or 'off' for no DP)"),
        (["--dp-epsilon", "-1"], "epsilon must be a positive number"),
        (["--dp-epsilon", "nan"], "epsilon must be a positive number"),
        (["--dp-epsilon", "lots"], "give a positive number or 'off'"),
        (["--exchange", "gossip"], "invalid choice: 'gossip'"),
        (["--superlink", "127.0.0.1:9093", "--in-process"], "not allowed with argument"),
        (["--superlink", "127.0.0.1:9093", "--local"], "not allowed with argument"),
        (["--servers", "127.0.0.1:5000"], "this command takes no server endpoints"),
        (["--servers", "3", "--local-servers", "3"], "two spellings of one flag: give --local-servers only"),
    ],
)
def test_bad_flags_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        _train(tmp_path, *args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "rounds=0 must be at least 1"),
        (["--lr", "-1"], "lr=-1.0 must be a positive number"),
        (["--dp-delta", "2"], "dp_delta=2.0 must be in (0, 1)"),
        (["--superlink", "127.0.0.1:9093", "--model", "m"], "--superlink needs --peers"),
        (["--sites", "2", "--data", "a.jsonl"], "--sites and --data exclude each other"),
        (["--sites", "0"], "at least 1 site"),
        (["--local-servers", "0"], "--local-servers 0: at least 1 block server"),
        (["--local-servers", "3", "--replicas", "2"], "--replicas 2 must divide --local-servers 3"),
    ],
)
def test_bad_settings_exit_2_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path, ran: list[Any], args: list[str], message: str
) -> None:
    assert _train(tmp_path, "--model", str(model), *args) == 2
    assert message in capsys.readouterr().err
    assert ran == []


def test_superlink_needs_the_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path, "--superlink", "127.0.0.1:9093", "--peers", "/ip4/1.2.3.4/tcp/1") == 2
    assert "--superlink needs --model" in capsys.readouterr().err


def test_a_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], ran: list[Any]) -> None:
    assert _train(tmp_path, "--model", str(tmp_path / "nope")) == 4
    assert "does not exist" in capsys.readouterr().err
    assert ran == []


def test_defaults_start_a_local_consortium_of_three_sites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path, ran: list[dict[str, Any]]
) -> None:
    assert _train(tmp_path, "--model", str(model), "--rounds", "2", "--targets", "q_proj, v_proj") == 0

    [call] = ran
    config: TrainConfig = call["config"]
    assert config.rounds == 2 and config.targets == ("q_proj", "v_proj")
    assert config.dp_epsilon == 3.0 and config.secure_agg  # TrainConfig's defaults for what was not given
    assert config.model == str(model.resolve()) and config.sites == 3
    assert config.out_dir == str((tmp_path / "ws" / "train-local" / "out").resolve())
    assert call["root"] == tmp_path / "ws" / "train-local" and call["servers"] == 2
    assert [p.name for p in call["site_data"]] == ["site-0.jsonl", "site-1.jsonl", "site-2.jsonl"]
    assert config.test_data == str(call["test_data"])
    captured = capsys.readouterr()
    assert "adapter: /out/adapter" in captured.out and "accuracy 0.75" in captured.out
    assert "WARNING" not in captured.err


def test_dp_off_and_no_secure_agg_are_said_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path, ran: list[dict[str, Any]]
) -> None:
    assert _train(tmp_path, "--model", str(model), "--dp-epsilon", "off", "--no-secure-agg", "--sites", "2") == 0

    config: TrainConfig = ran[0]["config"]
    assert config.dp_epsilon is None and not config.dp and not config.secure_agg and config.sites == 2
    err = capsys.readouterr().err
    assert "WARNING: differential privacy is OFF" in err
    assert "aggregated in the clear" in err


def test_in_process_trains_without_flower(
    tmp_path: Path, model: Path, ran: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[TrainConfig, list[Path], Path]] = []
    local = types.ModuleType("corolla.federation.local")
    summary = types.SimpleNamespace(to_json=dict)  # a RunSummary with nothing in it
    local.run_local = lambda config, sites_data, test_data: calls.append((config, sites_data, test_data)) or summary  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "corolla.federation.local", local)

    assert _train(tmp_path, "--model", str(model), "--in-process", "--sites", "2", "--dp-epsilon", "1.5") == 0

    [(config, sites_data, test_data)] = calls
    assert config.dp_epsilon == 1.5 and config.peers == () and len(sites_data) == 2
    assert test_data.name == "test.jsonl" and ran == []


def test_the_old_spellings_still_reach_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path, ran: list[dict[str, Any]]
) -> None:
    """`--servers N` and `--out DIR` (now --local-servers, --out-dir): same run, one warning each."""
    assert _train(tmp_path, "--model", str(model), "--servers", "4", "--replicas", "2", "--out", "runs/a") == 0
    [call] = ran
    assert call["servers"] == 4 and call["replicas"] == 2
    assert call["config"].out_dir == str(Path("runs/a").resolve())
    err = capsys.readouterr().err
    assert "warning: --servers N is deprecated; use --local-servers N\n" in err
    assert "warning: --out DIR is deprecated; use --out-dir DIR\n" in err


def test_superlink_submits_to_the_federation(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    submitted: list[tuple[TrainConfig, Any]] = []
    monkeypatch.setattr(launcher, "submit", lambda config, control, **_: submitted.append((config, control)) or {})
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    args = ["--superlink", "10.0.0.5:9093", "--superlink-ca", str(ca), "--model", "/models/base"]
    assert _train(tmp_path, *args, "--peers", "/ip4/10.0.0.6/tcp/4001/p2p/Qm", "--node", "coordinator") == 0

    [(config, control)] = submitted
    assert control.connection.address == "10.0.0.5:9093" and control.connection.root_certificates == ca
    assert config.model == "/models/base" and config.peers == ("/ip4/10.0.0.6/tcp/4001/p2p/Qm",)
    assert config.node == "coordinator" and config.workspace == str(tmp_path / "ws")
    assert config.sites == 0  # do not wait for a number of sites unless told


def test_malformed_or_empty_site_data_is_a_clear_error_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path, ran: list[Any]
) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Symptoms: fever. Diagnosis:", "completion": " pneumonia"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    common = ("--model", str(model), "--test-data", str(good))
    assert _train(tmp_path, *common, "--data", str(good), "--data", str(bad)) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert _train(tmp_path, *common, "--data", str(empty)) == 2
    assert "no records" in capsys.readouterr().err
    assert ran == []


def _table_file(path: Path) -> Path:
    from corolla.verify.tolerance import load_table

    path.write_text(load_table().model_dump_json())
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the tolerance table {path}: No such file or directory"),
        ("", "{path} is not a valid tolerance table (1 error; first: Invalid JSON: EOF while parsing"),
        ('{"format": "corolla-tolerances/2"}', "{path} is not a valid tolerance table (1 error; first: models:"),
    ],
    ids=["missing", "empty", "not a table"],
)
def test_a_bad_tolerance_table_is_a_clear_error_before_anything_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: Path,
    ran: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    content: str | None,
    message: str,
) -> None:
    path = tmp_path / "calibrated.json"
    if content is not None:
        path.write_text(content)
    submitted: list[Any] = []
    monkeypatch.setattr(launcher, "submit", lambda config, control, **_: submitted.append(config) or {})
    assert _train(tmp_path, "--model", str(model), "--tolerances", str(path)) == 13
    assert f"platform train: {message.format(path=path)}" in capsys.readouterr().err
    superlink = ["--superlink", "10.0.0.5:9093", "--model", "/m", "--peers", "/ip4/10.0.0.6/tcp/4001"]
    assert _train(tmp_path, *superlink, "--tolerances", str(path)) == 13
    assert ran == [] and submitted == []


def test_the_tolerance_table_goes_into_the_run_config_as_an_absolute_path(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: Path,
    ran: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = _table_file(tmp_path / "calibrated.json")
    monkeypatch.chdir(tmp_path)
    assert _train(tmp_path, "--model", str(model), "--tolerances", "calibrated.json") == 0
    config: TrainConfig = ran[0]["config"]
    assert config.tolerances == str(path.resolve())
    assert TrainConfig.from_run_config(config.to_run_config()).tolerances == str(path.resolve())
    assert "--tolerances" not in capsys.readouterr().err

    assert _train(tmp_path, "--model", str(model), "--tolerances", "calibrated.json", "--audit-rate", "0") == 0
    assert "note: --tolerances has no effect without spot checks" in capsys.readouterr().err
    assert _train(tmp_path, "--model", str(model)) == 0
    assert ran[-1]["config"].tolerances == ""  # the shipped table
