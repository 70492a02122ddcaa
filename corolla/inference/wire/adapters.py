"""LoRA adapters on the wire: named tensors, a scaling, and a content hash.

A client sends a server the adapter weights for its span once per optimizer step and
then refers to them by hash. The hash is SHA-256 over a canonical encoding (names in
sorted order, each with dtype, shape and raw bytes, then the scaling), so the same
weights always give the same hash and a server can check that what it stored is what
the client meant. Names are `<block>.<module path>.lora_A|lora_B` (see blocks.proto).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from corolla.inference.errors import BadRequestError
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire.tensors import DTYPE_NAMES, deserialize, serialize

__all__ = [
    "AdapterKey",
    "adapter_hash",
    "adapter_message",
    "named_tensors",
    "parse_adapter",
    "parse_name",
    "tensor_name",
]

_DOMAIN = b"corolla-lora-adapter-v1\x00"
# one spelling per tensor: ASCII digits without leading zeros (`\d` alone also takes "٣" and
# "03", two more names for block 3 that would slip past the duplicate check)
_NAME = re.compile(r"(0|[1-9][0-9]{0,5})\.([A-Za-z_][A-Za-z0-9_.]{0,127})\.(lora_A|lora_B)")


@dataclass(frozen=True, slots=True)
class AdapterKey:
    block: int  # absolute block index
    module: str  # module path inside the block, e.g. "self_attn.q_proj"
    part: str  # "lora_A" or "lora_B"


def tensor_name(block: int, module: str, part: str) -> str:
    return f"{block}.{module}.{part}"


def parse_name(name: str) -> AdapterKey:
    match = _NAME.fullmatch(name)
    if match is None:
        raise BadRequestError(f"adapter tensor name {name!r} is not '<block>.<module>.lora_A|lora_B'")
    return AdapterKey(block=int(match[1]), module=match[2], part=match[3])


def adapter_hash(tensors: Mapping[str, torch.Tensor], scaling: float) -> str:
    digest = hashlib.sha256(_DOMAIN)
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        if tensor.dtype not in DTYPE_NAMES:
            raise BadRequestError(f"adapter tensor {name!r}: dtype {tensor.dtype} cannot be sent")
        digest.update(name.encode() + b"\x00" + DTYPE_NAMES[tensor.dtype].encode() + b"\x00")
        digest.update(struct.pack(f">{tensor.dim() + 1}q", tensor.dim(), *tensor.shape))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(struct.pack(">d", scaling))
    return digest.hexdigest()


def adapter_message(tensors: Mapping[str, torch.Tensor], scaling: float, digest: str | None = None) -> pb.Adapter:
    return pb.Adapter(
        hash=digest or adapter_hash(tensors, scaling),
        scaling=scaling,
        tensors=[pb.NamedTensor(name=name, tensor=serialize(tensors[name])) for name in sorted(tensors)],
    )


def named_tensors(message: Mapping[str, torch.Tensor]) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=name, tensor=serialize(t)) for name, t in message.items()]


def parse_adapter(message: pb.Adapter, *, max_elements: int) -> tuple[str, float, dict[str, torch.Tensor]]:
    """Check an adapter from the network: names, 2-D tensors, finite values, the hash.
    Returns (hash, scaling, tensors). Shapes against the model are the server's check."""
    if not message.tensors:
        raise BadRequestError("adapter: no tensors")
    scaling = float(message.scaling)
    if not (scaling == scaling and abs(scaling) < 1e6):  # NaN fails the first test
        raise BadRequestError(f"adapter: scaling {message.scaling!r} is not a finite number below 1e6")
    tensors: dict[str, torch.Tensor] = {}
    budget = max_elements
    for item in message.tensors:
        parse_name(item.name)
        if item.name in tensors:
            raise BadRequestError(f"adapter: tensor {item.name!r} appears twice")
        tensor = deserialize(item.tensor, name=item.name, shape=(None, None), max_elements=budget)
        budget -= tensor.numel()
        if not torch.isfinite(tensor).all():
            raise BadRequestError(f"adapter: {item.name!r} contains NaN or infinite values")
        tensors[item.name] = tensor
    expected = adapter_hash(tensors, scaling)
    # bytes: compare_digest raises TypeError on a str with non-ASCII characters
    if not hmac.compare_digest(expected.encode(), message.hash.encode("utf-8", "surrogatepass")):
        raise BadRequestError("adapter: the hash does not match the weights sent (corrupted or mislabelled)")
    return expected, scaling, tensors
