"""Tensors on the wire: raw bytes, a dtype name and a shape. Never pickle.

Everything read from the network is checked before a byte becomes a tensor: the
dtype is one of a short list, the shape has the expected rank and sizes, and the
byte count is exactly shape-product x itemsize. Any mismatch is a `BadRequestError`
naming what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from corolla.inference.errors import BadRequestError
from corolla.inference.wire import blocks_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_RANK = 8  # the wire carries at most 3-D tensors; torch itself refuses more than 64 dims
_MAX_EXTENT = (1 << 63) - 1  # torch computes strides and byte sizes in int64


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise BadRequestError(f"dtype {name!r} is not allowed; allowed: {', '.join(DTYPES)}") from None


def serialize(tensor: torch.Tensor, *, wire_dtype: torch.dtype | None = None) -> pb.Tensor:
    """`tensor` as raw bytes, optionally cast to `wire_dtype` (e.g. bfloat16 to halve traffic)."""
    if wire_dtype is not None:
        tensor = tensor.to(wire_dtype)
    if tensor.dtype not in DTYPE_NAMES:
        raise BadRequestError(f"cannot send a tensor of dtype {tensor.dtype}; allowed: {', '.join(DTYPES)}")
    tensor = tensor.detach().contiguous().cpu()
    # uint8 view: bytes of any dtype, bfloat16 included (numpy has no bfloat16)
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return pb.Tensor(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), data=data)


def deserialize(
    message: pb.Tensor,
    *,
    name: str,
    shape: Sequence[int | None] | None = None,
    max_elements: int | None = None,
) -> torch.Tensor:
    """Check and rebuild a tensor. `shape` gives the expected shape (`None` = any size on
    that axis); `name` says which field, for the error message."""
    dtype = dtype_from_name(message.dtype)
    got = tuple(int(d) for d in message.shape)
    if len(got) > MAX_RANK:
        raise BadRequestError(f"{name}: rank {len(got)} exceeds the limit of {MAX_RANK}")
    if any(d < 0 for d in got):
        raise BadRequestError(f"{name}: negative dimension in shape {got}")
    if shape is not None and (
        len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got, strict=False))
    ):
        expected = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        raise BadRequestError(f"{name}: shape {got} does not match the expected {expected}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    # a zero-size shape holds no data, but torch still computes its strides in int64:
    # (0, 2**62, 2) would fail inside torch with a RuntimeError, not as a bad request
    extent = itemsize
    for d in got:
        extent *= max(d, 1)
    if extent > _MAX_EXTENT:
        raise BadRequestError(f"{name}: shape {got} is too large to address in int64 bytes")
    elements = 1
    for d in got:
        elements *= d
    if max_elements is not None and elements > max_elements:
        raise BadRequestError(f"{name}: {elements} elements exceed the limit of {max_elements}")
    if len(message.data) != elements * itemsize:
        raise BadRequestError(
            f"{name}: {len(message.data)} bytes of data for shape {got} and dtype {message.dtype} "
            f"(expected {elements * itemsize}): truncated or padded tensor"
        )
    if elements == 0:
        return torch.empty(got, dtype=dtype)
    raw = torch.frombuffer(bytearray(message.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(got)
