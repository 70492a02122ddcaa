"""Reading a local Hugging Face checkpoint directory piece by piece.

A server reads only the tensors of its span and a client only its embeddings, norm
and head (`safetensors.safe_open` reads single tensors), so no process ever holds the
whole checkpoint. Sharded checkpoints (`model.safetensors.index.json`) work the same.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from corolla.inference.errors import ModelLoadError
from corolla.inference.models.family import ClientParts, ModelFamily
from corolla.inference.models.registry import family_for
from corolla.inference.models.span import Span

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


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
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read the config of {str(root)!r}: {exc}") from exc
        family = family_for(config)
        key_files = _key_files(root)
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

    def read(self, keys: Iterable[str], *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, each read on its own from its shard."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            if key not in self.key_files:
                raise ModelLoadError(f"tensor {key!r} is missing from {str(self.path)!r}")
            by_file[self.key_files[key]].append(key)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for key in file_keys:
                    tensor = handle.get_tensor(key)
                    out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out

    def load_span(self, start: int, end: int, *, dtype: torch.dtype = torch.float32) -> Span:
        if not 0 <= start < end <= self.num_blocks:
            raise ModelLoadError(
                f"span {start}:{end} is not within the model's {self.num_blocks} blocks (0:{self.num_blocks})"
            )
        blocks = []
        for index in range(start, end):
            prefix = self._block_prefix(index)
            keys = [k for k in self.key_files if k.startswith(prefix)]
            state = {k[len(prefix) :]: v for k, v in self.read(keys, dtype=dtype).items()}
            try:
                blocks.append(self.family.build_block(self.config, index, state))
            except KeyError as exc:
                raise ModelLoadError(f"block {index} of {str(self.path)!r} lacks tensor {exc}") from exc
        span = Span(family=self.family, config=self.config, start=start, end=end, blocks=blocks)
        return span.eval().requires_grad_(False)

    def load_client(self, *, dtype: torch.dtype = torch.float32) -> ClientParts:
        wanted: dict[str, str] = {}
        for name, candidates in self.family.client_keys().items():
            found = next((k for k in candidates if k in self.key_files), None)
            if found is not None:
                wanted[name] = found
        tensors = self.read(wanted.values(), dtype=dtype)
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


def _key_files(root: Path) -> dict[str, Path]:
    if (root / _INDEX).is_file():
        try:
            weight_map = json.loads((root / _INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{str(root / _INDEX)!r} is not a valid safetensors index: {exc}") from exc
        return {key: root / name for key, name in weight_map.items()}
    if (root / _SINGLE).is_file():
        with safe_open(str(root / _SINGLE), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), root / _SINGLE)
    raise ModelLoadError(f"{str(root)!r} has no {_SINGLE} or {_INDEX}; Corolla reads safetensors checkpoints only")
