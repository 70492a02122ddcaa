"""`corolla.toml`: values become the commands' defaults, flags override them, and a bad file
is one line naming the file, the table and the key, exit 2, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from corolla.platform import node_config
from corolla.platform.cli import build_parser, main
from corolla.platform.node_config import ConfigError, NodeConfig

SERVER = """
[node]
role = "server"
workspace = "{ws}"
peers = ["/ip4/10.0.0.2/tcp/31338/p2p/12D3KooWabc"]

[serve]
model = "/models/smollm2"
blocks = "0:15"
port = 31337
max-sessions = 8
no-dht = true

[audit]
ledger = "postgresql://corolla@db/ledger"
"""


def _write(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "corolla.toml"
    file.write_text(text)
    return file


def _parse(file: Path, argv: list[str]):  # type: ignore[no-untyped-def]
    parser = build_parser()
    node_config.apply(parser, argv, NodeConfig.load(file))
    return parser.parse_args(argv)


def test_file_values_are_defaults_and_flags_override_them(tmp_path: Path) -> None:
    file = _write(tmp_path, SERVER.format(ws=tmp_path / "ws"))
    args = _parse(file, ["serve"])  # --model is required, and the file gives it
    assert args.model == "/models/smollm2" and args.blocks == (0, 15) and args.port == 31337
    assert args.max_sessions == 8 and args.no_dht is True
    assert args.peers == ["/ip4/10.0.0.2/tcp/31338/p2p/12D3KooWabc"]  # [node] applies to serve
    assert args.workspace == str(tmp_path / "ws")
    args = _parse(file, ["serve", "--port", "4000", "--blocks", "15:30"])
    assert args.port == 4000 and args.blocks == (15, 30) and args.model == "/models/smollm2"


def test_group_table_applies_to_each_subcommand_that_takes_the_key(tmp_path: Path) -> None:
    file = _write(tmp_path, SERVER.format(ws=tmp_path / "ws"))
    assert _parse(file, ["audit", "verify"]).ledger == "postgresql://corolla@db/ledger"


def test_command_table_overrides_node(tmp_path: Path) -> None:
    file = _write(tmp_path, f'[node]\nworkspace = "{tmp_path}/a"\n[serve]\nworkspace = "{tmp_path}/b"\nmodel = "m"\n')
    assert _parse(file, ["serve"]).workspace == f"{tmp_path}/b"
    assert _parse(file, ["keys", "list"]).workspace == f"{tmp_path}/a"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[serve]\nport = "http"\n', r"\[serve\] port: 'http' is not valid"),
        ('[serve]\nquant = "int4"\n', r"\[serve\] quant: 'int4' is not one of int8, nf4"),
        ("[serve]\nprot = 3\n", r"\[serve\] prot: `platform serve` has no such setting"),
        ("[serv]\nport = 3\n", r"\[serv\] is not a command"),
        ('[node]\nrole = "king"\n', r"\[node\] role: Input should be"),
        ("[node]\ncolour = 3\n", r"\[node\] colour: no command has such a setting"),
        ("[serve]\nno-dht = 1\n", r"\[serve\] no-dht: 1 must be true or false"),
        ("[serve]\nport = [1, 2]\n", r"\[serve\] port: takes one value, not a list"),
        ("[serve\nport = 3\n", "not valid TOML"),
        ("serve = 3\n", "'serve' must be a table"),
    ],
)
def test_bad_files_name_the_file_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    file = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        node_config.check_all(build_parser(), NodeConfig.load(file))
    assert str(file) in str(info.value) or "not valid TOML" in message


def test_cli_refuses_a_bad_file_before_running_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = _write(tmp_path, f'[node]\nworkspace = "{tmp_path}/ws"\n[keys]\ndays = "soon"\n')
    assert main(["--config", str(file), "keys", "init-ca"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{file}: [keys] days: 'soon' is not valid" in err
    assert not (tmp_path / "ws").exists()  # nothing ran
    assert main(["--config", str(tmp_path / "missing.toml"), "keys", "list"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_command_runs_with_the_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = _write(tmp_path, f'[node]\nworkspace = "{tmp_path}/ws"\n[keys.init-ca]\nconsortium = "north"\n')
    assert main(["--config", str(file), "keys", "init-ca"]) == 0
    assert (tmp_path / "ws").is_dir() and any((tmp_path / "ws").rglob("*.pem"))
    monkeypatch.setenv(node_config.ENV, str(file))
    assert main(["keys", "list"]) == 0


def test_config_show_names_each_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = _write(tmp_path, SERVER.format(ws=tmp_path / "ws"))
    assert main(["--config", str(file), "config", "show", "serve", "--port", "4000"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["--port"].split()[1:] == ["4000", "flag"]
    assert lines["--model"].endswith(f"{file} [serve] model")
    assert lines["--peers"].endswith(f"{file} [node] peers")
    assert lines["--cache-mb"].split()[1:] == ["1024", "default"]


def test_config_check_accepts_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = _write(tmp_path, SERVER.format(ws=tmp_path / "ws"))
    assert main(["config", "check", str(file)]) == 0
    assert "valid (role server" in capsys.readouterr().out
