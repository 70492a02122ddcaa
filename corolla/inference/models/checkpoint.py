"""Reading a local Hugging Face checkpoint directory piece by piece.

A server reads only the tensors of its span and a client only its embeddings, norm
and head (`safetensors.safe_open` reads single tensors), so no process ever holds the
whole checkpoint. Sharded checkpoints (`model.safetensors.index.json`) work the same.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from corolla.inference.errors import ModelLoadError
from corolla.inference.models.family import ClientParts, ModelFamily
from corolla.inference.models.registry import family_for
from corolla.inference.models.span import Span

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# The safetensors library's own limit on a header: a larger length is a corrupt or hostile file.
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
# Config fields that size the model: each must be a positive integer when present.
_POSITIVE_FIELDS = (
    "num_hidden_layers",
    "n_layer",
    "hidden_size",
    "n_embd",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "n_positions",
)


class BlockQuantizer(Protocol):
    """Replaces, in place, a block's linear layers by quantized ones on `device` and moves the
    rest of the block there (the server's `quantization.block_quantizer`)."""

    def __call__(self, block: nn.Module, device: torch.device) -> object: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    path: Path
    config: PretrainedConfig
    family: ModelFamily
    key_files: Mapping[str, Path] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Read the config and the tensor index of `path`; no weights are loaded yet."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ModelLoadError(f"model directory {str(root)!r} does not exist")
        if not (root / "config.json").is_file():
            raise ModelLoadError(f"{str(root)!r} has no config.json: not a Hugging Face checkpoint directory")
        try:
            config = AutoConfig.from_pretrained(root, local_files_only=True)
        except Exception as exc:  # transformers raises many kinds (strict-dataclass errors among them)
            raise ModelLoadError(f"cannot read {str(root / 'config.json')!r}: {_one_line(exc)}") from exc
        _check_config(root / "config.json", config)
        family = family_for(config)
        key_files, shapes = _key_files(root)
        _check_shapes(root, config, key_files, shapes)
        return cls(path=root, config=config, family=family, key_files=key_files)

    @property
    def num_blocks(self) -> int:
        return self.family.num_blocks(self.config)

    @property
    def hidden_size(self) -> int:
        return self.family.hidden_size(self.config)

    @property
    def model_id(self) -> str:
        """Name plus a fingerprint of the config and weight files, so that servers and
        clients holding different weights under the same directory name never mix."""
        digest = hashlib.sha256((self.path / "config.json").read_bytes())
        for file in sorted(set(self.key_files.values())):
            with file.open("rb") as handle:
                digest.update(handle.read(1 << 16))
        return f"{self.path.name}-{digest.hexdigest()[:12]}"

    def read(
        self, keys: Iterable[str], *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The named tensors, each read on its own from its shard and copied to `device`
        (floating-point ones cast to `dtype`)."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            if key not in self.key_files:
                raise ModelLoadError(f"tensor {key!r} is missing from {str(self.path)!r}")
            by_file[self.key_files[key]].append(key)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in file_keys:
                        tensor = handle.get_tensor(key)  # backed by the file's memory map
                        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                        # A copy of our own: a tensor left on the map would keep the whole file mapped,
                        # and every page of it ever read would count in the process's resident memory.
                        out[key] = tensor.to(device=device, dtype=cast, copy=True)
            except (SafetensorError, OSError) as exc:  # changed or removed since `open` checked it
                raise ModelLoadError(f"cannot read tensors from {str(file)!r}: {exc}") from exc
        return out

    def load_span(
        self,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quantize: BlockQuantizer | None = None,
    ) -> Span:
        """Blocks `[start, end)` with their weights in `dtype` on `device`, built one block at a
        time. With `quantize`, each block is built on cpu and handed to it at once (it replaces
        the block's linear layers and moves the block to `device`), so the float weights of at
        most one block are held at a time: a quantized span never holds the float span."""
        if not 0 <= start < end <= self.num_blocks:
            raise ModelLoadError(
                f"span {start}:{end} is not within the model's {self.num_blocks} blocks (0:{self.num_blocks})"
            )
        target = torch.device(device)
        blocks = []
        for index in range(start, end):
            prefix = self._block_prefix(index)
            keys = [k for k in self.key_files if k.startswith(prefix)]
            on = "cpu" if quantize is not None else target
            state = {k[len(prefix) :]: v for k, v in self.read(keys, dtype=dtype, device=on).items()}
            try:
                block = self.family.build_block(self.config, index, state)
            except KeyError as exc:
                raise ModelLoadError(f"block {index} of {str(self.path)!r} lacks tensor {exc}") from exc
            del state  # the block holds what it needs; the rest goes now
            if quantize is not None:
                quantize(block.eval(), target)
            blocks.append(block)
        span = Span(family=self.family, config=self.config, start=start, end=end, blocks=blocks)
        return span.eval().requires_grad_(False)

    def load_client(self, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ClientParts:
        """Embeddings, final norm and LM head on `device` (a tied head shares the embedding's tensor)."""
        wanted: dict[str, str] = {}
        for name, candidates in self.family.client_keys().items():
            found = next((k for k in candidates if k in self.key_files), None)
            if found is not None:
                wanted[name] = found
        tensors = self.read(wanted.values(), dtype=dtype, device=device)
        try:
            client = self.family.build_client(self.config, {n: tensors[k] for n, k in wanted.items()})
        except KeyError as exc:
            raise ModelLoadError(f"{str(self.path)!r} lacks client tensor {exc}") from exc
        return client.eval().requires_grad_(False)

    def _block_prefix(self, index: int) -> str:
        for prefix in self.family.block_key_prefixes(index):
            if any(k.startswith(prefix) for k in self.key_files):
                return prefix
        raise ModelLoadError(f"no tensors for block {index} in {str(self.path)!r}")


def _key_files(root: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """Each tensor's file and its shape as its file's header declares it (headers checked)."""
    if (root / _INDEX).is_file():
        try:
            weight_map = json.loads((root / _INDEX).read_text())["weight_map"]
            key_files = {str(key): root / str(name) for key, name in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{str(root / _INDEX)!r} is not a valid safetensors index: {exc}") from exc
        shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(key_files.values())):
            if not file.is_file():
                raise ModelLoadError(f"{str(root / _INDEX)!r} names shard {str(file)!r}, which does not exist")
            shapes.update(_header_shapes(file))
        absent = sorted(key for key in key_files if key not in shapes)
        if absent:
            raise ModelLoadError(f"{str(root / _INDEX)!r} maps tensor {absent[0]!r} to a shard that lacks it")
        return key_files, shapes
    if (root / _SINGLE).is_file():
        shapes = _header_shapes(root / _SINGLE)
        return dict.fromkeys(shapes, root / _SINGLE), shapes
    raise ModelLoadError(f"{str(root)!r} has no {_SINGLE} or {_INDEX}; Corolla reads safetensors checkpoints only")


def _header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file's header declares, after checking that the header
    is JSON of a sane size and that every tensor's bytes lie within the file and match its
    dtype and shape (a truncated, random or lying file is refused here, not mid-load)."""
    where = repr(str(file))
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{where} is truncated: {size} bytes, not even a safetensors header length")
        header_len = int.from_bytes(head, "little")
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise ModelLoadError(
                f"{where} declares a {header_len}-byte safetensors header in a {size}-byte file "
                f"(at most {_MAX_HEADER_BYTES} and within the file): truncated or not a safetensors file"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError:
        raise ModelLoadError(f"{where} has a safetensors header that is not JSON: not a safetensors file") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{where} has a safetensors header that is not a JSON object")
    data_bytes = size - 8 - header_len
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shapes[name] = _entry_shape(where, name, entry, data_bytes)
    return shapes


def _entry_shape(where: str, name: str, entry: object, data_bytes: int) -> tuple[int, ...]:
    if not isinstance(entry, dict):
        raise ModelLoadError(f"{where}: header entry of tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise ModelLoadError(f"{where}: tensor {name!r} has dtype {dtype!r}, not a safetensors dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ModelLoadError(f"{where}: tensor {name!r} has shape {shape!r}, not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ModelLoadError(f"{where}: tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    if offsets[1] > data_bytes:
        raise ModelLoadError(
            f"{where}: tensor {name!r} ends at byte {offsets[1]} of a {data_bytes}-byte data section (truncated?)"
        )
    expected = math.prod(shape) * _DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise ModelLoadError(
            f"{where}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes, its data_offsets give "
            f"{offsets[1] - offsets[0]}"
        )
    return tuple(shape)


def _check_config(file: Path, config: PretrainedConfig) -> None:
    """Sizes that must be positive integers; heads that must divide the width."""
    for name in _POSITIVE_FIELDS:
        value = getattr(config, name, None)
        if value is None and name not in config.to_dict():
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelLoadError(f"{str(file)!r}: {name}={value!r} must be a positive integer")
    width = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise ModelLoadError(f"{str(file)!r}: hidden_size={width} must divide by num_attention_heads={heads}")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise ModelLoadError(
            f"{str(file)!r}: num_attention_heads={heads} must divide by num_key_value_heads={kv_heads}"
        )


def _check_shapes(
    root: Path, config: PretrainedConfig, key_files: Mapping[str, Path], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Every tensor's declared shape against the shape the config gives it (the model built
    on the meta device: no memory), so that a wrong shape is a load error, not a matmul
    error in the middle of a request."""
    try:
        with torch.device("meta"):
            reference = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # any failure to build means the config is not usable
        raise ModelLoadError(
            f"{str(root / 'config.json')!r} does not describe a buildable model: {_one_line(exc)}"
        ) from exc
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    prefixes = ("", "model.", "transformer.")
    for key, shape in shapes.items():
        want = next((expected[p + key] for p in prefixes if p + key in expected), None)
        if want is not None and want != shape:
            raise ModelLoadError(
                f"{str(key_files[key])!r}: tensor {key!r} has shape {list(shape)}, the config gives {list(want)}"
            )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
