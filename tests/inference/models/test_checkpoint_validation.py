"""`Checkpoint.open` refuses a bad checkpoint with one `ModelLoadError` naming the file,
field or tensor: a truncated or random file, a huge or lying safetensors header, a tensor
of the wrong shape, a config field out of range, a shard the index names but lacks."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from corolla.inference.errors import ModelLoadError
from corolla.inference.models.checkpoint import Checkpoint

WEIGHTS = "model.safetensors"


@pytest.fixture
def model_dir(tiny_llama: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Llama, free to break."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def write_raw(path: Path, header: object, data: bytes = b"", *, declared: int | None = None) -> None:
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)


def refused(path: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        Checkpoint.open(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_good_checkpoint_opens_and_loads(model_dir: Path) -> None:
    checkpoint = Checkpoint.open(model_dir)
    assert checkpoint.num_blocks == 4
    checkpoint.load_span(0, 4)
    checkpoint.load_client()


def test_a_truncated_file_is_refused(model_dir: Path) -> None:
    file = model_dir / WEIGHTS
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    message = refused(model_dir)
    assert WEIGHTS in message
    assert "truncated" in message


def test_a_file_shorter_than_the_header_length_is_refused(model_dir: Path) -> None:
    (model_dir / WEIGHTS).write_bytes(b"\x01\x02\x03")
    assert "truncated" in refused(model_dir)


def test_random_bytes_are_refused(model_dir: Path) -> None:
    (model_dir / WEIGHTS).write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes()
    )
    assert WEIGHTS in refused(model_dir)


def test_a_huge_header_length_is_refused_before_reading(model_dir: Path) -> None:
    write_raw(model_dir / WEIGHTS, {}, declared=2**60)
    message = refused(model_dir)
    assert str(2**60) in message


def test_a_header_that_is_not_json_is_refused(model_dir: Path) -> None:
    (model_dir / WEIGHTS).write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{{")
    assert "not JSON" in refused(model_dir)


def test_offsets_beyond_the_file_are_refused(model_dir: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}
    write_raw(model_dir / WEIGHTS, header, b"\0" * 16)
    message = refused(model_dir)
    assert "'w'" in message
    assert "truncated" in message


def test_offsets_that_disagree_with_the_shape_are_refused(model_dir: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}
    write_raw(model_dir / WEIGHTS, header, b"\0" * 8)
    assert "needs 16 bytes" in refused(model_dir)


def test_an_unknown_dtype_is_refused(model_dir: Path) -> None:
    write_raw(model_dir / WEIGHTS, {"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert "'F33'" in refused(model_dir)


def test_a_tensor_of_the_wrong_shape_is_refused(model_dir: Path) -> None:
    tensors = load_file(model_dir / WEIGHTS)
    key = "model.layers.1.self_attn.q_proj.weight"
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, model_dir / WEIGHTS, metadata={"format": "pt"})
    message = refused(model_dir)
    assert key in message
    assert "[3, 5]" in message
    assert "[64, 64]" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_hidden_layers", -3), ("hidden_size", 0), ("num_attention_heads", "four")],
)
def test_a_config_field_out_of_range_is_refused(model_dir: Path, field: str, value: object) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config[field] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    message = refused(model_dir)
    assert "config.json" in message
    assert field in message
    assert str(value) in message


def test_heads_that_do_not_divide_the_width_are_refused(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["num_attention_heads"] = 3
    (model_dir / "config.json").write_text(json.dumps(config))
    message = refused(model_dir)  # transformers' own check, or ours on an older transformers
    assert "config.json" in message
    assert "num_attention_heads=3" in message or "attention heads (3)" in message


def test_an_index_naming_a_missing_shard_is_refused(model_dir: Path) -> None:
    keys = list(load_file(model_dir / WEIGHTS))
    (model_dir / WEIGHTS).unlink()
    index = {"weight_map": dict.fromkeys(keys, "model-00001-of-00002.safetensors")}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00001-of-00002.safetensors" in refused(model_dir)
