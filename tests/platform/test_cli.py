"""The `platform` command line: the embedded default, exit codes, status output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.inference.discovery import ServerRecord
from corolla.platform.cli import main
from corolla.platform.commands.swarm import format_status


def run_cli(*args: str, workspace: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COROLLA_WORKSPACE=str(workspace))
    return subprocess.run(
        [sys.executable, "-m", "corolla", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_init_tiny_writes_a_loadable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "init-tiny", str(tmp_path / "g"), "--arch", "gpt2", "--layers", "2"]) == 0
    assert "tiny gpt2" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "g")
    assert model.config.n_layer == 2
    ids = tokenizer("fever and cough").input_ids
    assert tokenizer.decode(ids) == "fever and cough"


@pytest.mark.e2e
def test_generate_with_no_arguments_runs_an_embedded_swarm(tmp_path: Path) -> None:
    result = run_cli("generate", "--max-new-tokens", "8", workspace=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The patient presented with")
    assert len(result.stdout.strip()) > len("The patient presented with")
    assert "embedded swarm of 2 servers" in result.stderr
    assert (tmp_path / "models" / "tiny-llama" / "config.json").is_file()


def test_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", str(tmp_path / "nope"), "--no-dht", "--insecure"]) == 4
    assert "does not exist" in capsys.readouterr().err


def test_serve_needs_an_identity_or_insecure(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", str(tiny_llama)]) == 8
    assert "give --node NAME" in capsys.readouterr().err


def test_serve_refuses_a_certificate_of_another_role(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "init-ca", "--workspace", str(tmp_path)]) == 0
    assert main(["keys", "issue", "--workspace", str(tmp_path), "--role", "site", "--name", "h1"]) == 0
    assert main(["serve", "--model", str(tiny_llama), "--workspace", str(tmp_path), "--node", "h1"]) == 8
    assert "role site" in capsys.readouterr().err


def test_bad_span_syntax_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--model", "x", "--blocks", "4"])
    assert info.value.code == 2
    assert "START:END" in capsys.readouterr().err


def test_bad_peer_address_is_a_clear_error(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--model", str(tiny_llama), "--blocks", "0:2", "--insecure", "--peers", "not-a-multiaddr"])
    assert code == 6
    assert "not-a-multiaddr" in capsys.readouterr().err


def test_status_names_uncovered_blocks() -> None:
    now = time.time()
    records = [
        ServerRecord(
            node_id="QmA",
            endpoint="127.0.0.1:5001",
            model_id="m",
            start=0,
            end=2,
            throughput=900.0,
            step_ms_per_block=0.2,
            free_cache_bytes=2**30,
            dtype="float32",
            quant=None,
            updated_at=now,
            expires_at=now + 30,
        ),
        ServerRecord(
            node_id="QmB",
            endpoint="127.0.0.1:5002",
            model_id="m",
            start=3,
            end=5,
            throughput=800.0,
            step_ms_per_block=0.3,
            free_cache_bytes=2**29,
            dtype="bfloat16",
            quant="nf4",
            updated_at=now,
            expires_at=now + 30,
        ),
    ]
    text = format_status("m", records, 6)
    assert "2 server(s)" in text
    assert "NOT covered: 2:3, 5:6" in text
    assert "servers per block: 1 1 0 1 1 0" in text
    assert "127.0.0.1:5002" in text and "nf4" in text


def test_generate_with_adapter_matches_peft(
    tiny_llama: Path, start_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`platform generate --adapter-dir DIR`: the servers apply the adapter; the text equals
    plain PEFT's greedy generation with the same directory on the base checkpoint."""
    import torch
    from peft import PeftModel

    from corolla.inference.client import LoraAdapter, LoraSettings
    from corolla.inference.models import Checkpoint

    adapter = LoraAdapter.init(Checkpoint.open(tiny_llama), LoraSettings(r=4, targets=("q_proj", "v_proj")), seed=0)
    with torch.no_grad():
        for name, p in adapter.named_weights():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    adapter.save_peft(tmp_path / "adapter")
    servers = [start_server(tiny_llama, span) for span in [(0, 2), (2, 4)]]
    args = ["generate", "fever and cough", "--model", str(tiny_llama), "--max-new-tokens", "12", "--insecure"]
    for s in servers:
        args += ["--servers", s.endpoint]
    assert main([*args, "--adapter-dir", str(tmp_path / "adapter")]) == 0
    got = capsys.readouterr().out.strip()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter")
    ids = tokenizer("fever and cough", return_tensors="pt").input_ids
    want_ids = peft_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    want = tokenizer.decode(want_ids[0], skip_special_tokens=True).strip()
    assert got == want
    assert main([*args]) == 0  # without the adapter the text differs: it was applied
    assert capsys.readouterr().out.strip() != want
    assert main([*args, "--adapter-dir", str(tmp_path / "nope")]) == 4
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_generate_audits_with_the_tolerance_table_given(
    tiny_llama: Path, start_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`platform generate --audit-rate R --tolerances FILE`: the audits written to the ledger
    were judged against FILE's tolerances, not the shipped ones."""
    from corolla.verify.ledger import Ledger
    from corolla.verify.tolerance import load_table

    data = load_table().model_dump(mode="json")
    for entry in data["models"]["tiny"]["tolerances"]["float32/float32"].values():  # tiny_llama: hidden 64
        entry["rel_l2"], entry["max_abs"] = 0.0123, 0.0456
    table = tmp_path / "calibrated.json"
    table.write_text(json.dumps(data))
    servers = [start_server(tiny_llama, (0, 4)) for _ in range(2)]  # two replicas: each checks the other
    ledger = tmp_path / "ledger.db"
    args = ["generate", "fever and cough", "--model", str(tiny_llama), "--max-new-tokens", "3", "--insecure"]
    args += ["--workspace", str(tmp_path / "ws"), "--ledger", str(ledger), "--audit-rate", "1"]
    for s in servers:
        args += ["--servers", s.endpoint]
    assert main([*args, "--tolerances", str(table)]) == 0
    with Ledger.open(str(ledger)) as opened:
        audits = [stored.event for stored in opened.events() if stored.event.kind == "audit"]
    assert audits and all((a.tolerance_rel_l2, a.tolerance_max_abs) == (0.0123, 0.0456) for a in audits)


def test_generate_refuses_a_bad_tolerance_table_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "calibrated.json"
    bad.write_text('{"format": "corolla-tolerances/1", "settings": {}}')
    # No server listens there, and no model is there: the table is refused before either is tried.
    args = ["generate", "--model", str(tmp_path / "nope"), "--servers", "127.0.0.1:9", "--audit-rate", "0.5"]
    assert main([*args, "--tolerances", str(bad)]) == 13
    err = capsys.readouterr().err
    assert err.startswith(f"platform generate: {bad} is a format-1 tolerance table (absolute bounds")
    assert main([*args, "--tolerances", str(tmp_path / "missing.json")]) == 13
    assert "cannot read the tolerance table" in capsys.readouterr().err


def test_keys_issue_agreement_certifies_a_key_for_an_existing_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = str(tmp_path / "ws")
    assert main(["keys", "init-ca", "--workspace", ws]) == 0
    assert main(["keys", "issue", "--workspace", ws, "--role", "site", "--name", "clinic"]) == 0
    node_dir = tmp_path / "ws" / "nodes" / "clinic"
    capsys.readouterr()
    assert main(["keys", "issue-agreement", "--workspace", ws, "--name", "clinic"]) == 8  # it has one
    assert "already has a key-agreement certificate" in capsys.readouterr().err
    # as a site issued before secure aggregation: no agreement key, none in the CA's registry
    (node_dir / "agreement.key").unlink()
    (node_dir / "agreement.pem").unlink()
    registry_path = tmp_path / "ws" / "ca" / "registry.json"
    registry = json.loads(registry_path.read_text())
    entry = registry["clinic"] if "clinic" in registry else next(e for e in registry["nodes"] if e["name"] == "clinic")
    entry["agreement_serial"] = None
    registry_path.write_text(json.dumps(registry))
    assert main(["keys", "issue-agreement", "--workspace", ws, "--name", "clinic"]) == 0
    assert "certified a key-agreement key for clinic" in capsys.readouterr().out
    assert (node_dir / "agreement.key").is_file() and (node_dir / "agreement.pem").is_file()
