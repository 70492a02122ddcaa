"""Issue 13, finding 7: every operator mistake it lists, run as a command.

Each ends with a non-zero, documented exit code (the table in `corolla/platform/cli.py`)
and exactly one line on stderr naming the file, field or value; never a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from corolla.inference.discovery import ServerRecord
from corolla.inference.errors import AccessDeniedError
from corolla.pki import ConsortiumCA, WorkspaceError
from corolla.platform.cli import main
from corolla.platform.commands.swarm import format_status, tls_refusals
from corolla.platform.workspace import throwaway_consortium

WEIGHTS = "model.safetensors"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`platform ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *, code: int, naming: str | list[str]) -> str:
    """Run `argv`; it must exit `code` with one stderr line that names each of `naming`."""
    got, _, err = run(argv, capsys)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert got == code, err
    for word in [naming] if isinstance(naming, str) else naming:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def model_dir(tiny_llama: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


@pytest.fixture
def consortium(tmp_path: Path) -> Path:
    """A workspace with a CA, a server `server-0` and a site `site-0`."""
    workspace = tmp_path / "ws"
    throwaway_consortium(workspace, servers=1, sites=1)
    return workspace


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def serve(model: Path, *extra: str) -> list[str]:
    return ["serve", "--model", str(model), "--blocks", "0:2", *extra]


def insecure_serve(model: Path) -> list[str]:
    return serve(model, "--insecure", "--no-dht")


def generate(model: Path, *extra: str) -> list[str]:
    return ["generate", "hi", "--model", str(model), "--servers", "127.0.0.1:1", *extra]


def train(model: Path, workspace: Path) -> list[str]:
    return ["train", "--in-process", "--model", str(model), "--workspace", str(workspace)]


def set_config(model: Path, **fields: object) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(fields)
    (model / "config.json").write_text(json.dumps(config))


# -- checkpoints: exit 4, naming the file and the field ------------------------------------------


def test_serve_a_truncated_checkpoint(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = model_dir / WEIGHTS
    file.write_bytes(file.read_bytes()[:1000])
    refused(insecure_serve(model_dir), capsys, code=4, naming=[str(file), "truncated"])


def test_serve_a_random_checkpoint(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    noise = torch.randint(0, 256, (8192,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    (model_dir / WEIGHTS).write_bytes(noise.numpy().tobytes())
    refused(insecure_serve(model_dir), capsys, code=4, naming=str(model_dir / WEIGHTS))


def test_generate_with_a_huge_header(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (model_dir / WEIGHTS).write_bytes(struct.pack("<Q", 2**62) + b"{}")
    refused(generate(model_dir, "--insecure"), capsys, code=4, naming=[str(model_dir / WEIGHTS), str(2**62)])


def test_train_with_a_lying_header(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = json.dumps({"lm_head.weight": {"dtype": "F32", "shape": [512, 64], "data_offsets": [0, 131072]}})
    (model_dir / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64)
    refused(train(model_dir, tmp_path / "ws"), capsys, code=4, naming=["lm_head.weight", str(model_dir / WEIGHTS)])


def test_serve_a_tensor_of_the_wrong_shape(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = load_file(model_dir / WEIGHTS)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, model_dir / WEIGHTS, metadata={"format": "pt"})
    refused(insecure_serve(model_dir), capsys, code=4, naming=["model.layers.0.mlp.up_proj.weight", "[7, 64]"])


@pytest.mark.parametrize("command", ["serve", "generate", "train"])
def test_negative_num_hidden_layers(
    command: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_config(model_dir, num_hidden_layers=-3)
    argv = {
        "serve": insecure_serve(model_dir),
        "generate": generate(model_dir, "--insecure"),
        "train": train(model_dir, tmp_path / "ws"),
    }[command]
    refused(argv, capsys, code=4, naming=["config.json", "num_hidden_layers=-3"])


def test_a_bad_checkpoint_shows_no_traceback_in_a_real_process(model_dir: Path, tmp_path: Path) -> None:
    set_config(model_dir, num_hidden_layers=-3)
    env = dict(os.environ, COROLLA_WORKSPACE=str(tmp_path / "ws"))
    result = subprocess.run(
        [sys.executable, "-m", "corolla", *insecure_serve(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "num_hidden_layers=-3" in result.stderr


# -- model init-tiny: exit 4 ---------------------------------------------------------------------------


def test_init_tiny_into_an_unwritable_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    refused(["model", "init-tiny", str(blocker / "model")], capsys, code=4, naming=str(blocker))


def test_init_tiny_over_an_existing_checkpoint(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (model_dir / WEIGHTS).read_bytes()
    refused(["model", "init-tiny", str(model_dir), "--seed", "7"], capsys, code=4, naming=[str(model_dir), "--force"])
    assert (model_dir / WEIGHTS).read_bytes() == before


def test_init_tiny_force_overwrites(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (model_dir / WEIGHTS).read_bytes()
    code, _, _ = run(["model", "init-tiny", str(model_dir), "--seed", "7", "--force"], capsys)
    assert code == 0
    assert (model_dir / WEIGHTS).read_bytes() != before


# -- ports: usage errors (exit 2), a port in use (exit 7) ----------------------------------------------


@pytest.mark.parametrize("port", ["99999", "-1", "65536", "http"])
def test_serve_port_out_of_range(port: str, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused([*insecure_serve(model_dir), "--port", port], capsys, code=2, naming=["--port", port])


def test_swarm_bootstrap_port_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    refused(["swarm", "bootstrap", "--insecure", "--dht-port", "70000"], capsys, code=2, naming=["--dht-port", "70000"])


def test_serve_port_in_use(model_dir: Path, busy_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*insecure_serve(model_dir), "--port", str(busy_port)]
    refused(argv, capsys, code=7, naming=[f"--port {busy_port}", "already in use"])


# -- keys and identities: exit 2 (usage) or 8 (PKI) ------------------------------------------------------


@pytest.mark.parametrize("days", ["-5", "0"])
def test_keys_issue_negative_days(days: str, consortium: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["keys", "issue", "--role", "site", "--name", "x", "--days", days, "--workspace", str(consortium)]
    refused(argv, capsys, code=2, naming=["--days", days])
    assert not (consortium / "nodes" / "x").exists()


def test_the_ca_itself_refuses_days_below_one(consortium: Path) -> None:
    with pytest.raises(WorkspaceError, match="days=0"):
        ConsortiumCA.open(consortium).issue("x", "site", days=0)


def test_a_workspace_that_cannot_be_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    refused(["keys", "list", "--workspace", str(blocker / "ws")], capsys, code=1, naming=str(blocker))


def test_garbage_node_key(model_dir: Path, consortium: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = consortium / "nodes" / "server-0" / "node.key"
    key.write_bytes(os.urandom(64))
    argv = serve(model_dir, "--node", "server-0", "--workspace", str(consortium))
    refused(argv, capsys, code=8, naming=str(key))


def test_a_refused_role_is_said_once(model_dir: Path, consortium: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(serve(model_dir, "--node", "site-0", "--workspace", str(consortium)), capsys, code=8, naming="site")
    assert line.count("platform serve:") == 1


def test_keys_list_marks_expired_and_revoked(consortium: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = ConsortiumCA.open(consortium)
    ca.issue("old", "site", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    ca.revoke("site-0")
    code, out, _ = run(["keys", "list", "--workspace", str(consortium)], capsys)
    assert code == 0
    status = {line.split()[0]: line.split()[2] for line in out.splitlines()[1:]}
    assert status == {"old": "expired", "server-0": "valid", "site-0": "revoked"}


def test_generate_as_a_revoked_site(model_dir: Path, consortium: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ConsortiumCA.open(consortium).revoke("site-0")
    argv = generate(model_dir, "--node", "site-0", "--workspace", str(consortium))
    line = refused(argv, capsys, code=8, naming=[str(consortium / "nodes" / "site-0" / "node.pem"), "revoked"])
    assert "own certificate" in line


def test_generate_as_an_expired_site(model_dir: Path, consortium: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ConsortiumCA.open(consortium).issue("old", "site", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    argv = generate(model_dir, "--node", "old", "--workspace", str(consortium))
    refused(argv, capsys, code=8, naming=[str(consortium / "nodes" / "old" / "node.pem"), "expired"])


def test_serve_with_an_expired_certificate(
    model_dir: Path, consortium: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ConsortiumCA.open(consortium).issue("old", "server", days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    argv = serve(model_dir, "--node", "old", "--workspace", str(consortium), "--no-dht")
    refused(argv, capsys, code=8, naming=[str(consortium / "nodes" / "old" / "node.pem"), "expired"])


# -- train: --test-data without --data is a usage error (exit 2) ----------------------------------------


def test_train_test_data_without_data(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = tmp_path / "held-out.jsonl"
    test.write_text('{"text": "a note"}\n')
    refused(
        [*train(model_dir, tmp_path / "ws"), "--test-data", str(test)], capsys, code=2, naming=[str(test), "--data"]
    )


# -- swarm status: a server this node's TLS refuses is no coverage ---------------------------------------


def record(endpoint: str, start: int, end: int) -> ServerRecord:
    return ServerRecord(
        node_id="12D3KooWRefused",
        endpoint=endpoint,
        model_id="m",
        start=start,
        end=end,
        throughput=1.0,
        step_ms_per_block=1.0,
        free_cache_bytes=0,
        dtype="float32",
        quant=None,
        updated_at=0.0,
        expires_at=1e12,
    )


class RefusingTls:
    """A TlsConfig stand-in whose handshake check refuses one endpoint."""

    def __init__(self, refuse: str) -> None:
        self.refuse = refuse

    def verify_server(self, endpoint: str, **_: object) -> None:
        if endpoint == self.refuse:
            raise AccessDeniedError(f"{endpoint}: certificate of 'bad' is expired or not yet valid")


def test_swarm_status_does_not_count_a_refused_server() -> None:
    records = [record("10.0.0.1:1", 0, 2), record("10.0.0.2:1", 2, 4)]
    refusals = tls_refusals(RefusingTls("10.0.0.2:1"), records)  # type: ignore[arg-type]
    assert refusals == {"10.0.0.2:1": "certificate of 'bad' is expired or not yet valid"}
    text = format_status("m", records, 4, refused=refusals)
    assert "1 refused by TLS" in text.splitlines()[0]
    assert "REFUSED: certificate of 'bad' is expired" in next(line for line in text.splitlines() if "10.0.0.2" in line)
    assert "NOT covered: 2:4" in text
    assert "servers per block: 1 1 0 0" in text
