"""Tensor encoding: exact round trips, and every malformed message is a clear error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corolla.inference.errors import BadRequestError
from corolla.inference.wire import blocks_pb2 as pb
from corolla.inference.wire.tensors import deserialize, serialize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
)
def test_round_trip_is_bit_exact(shape: list[int], dtype: torch.dtype, seed: int) -> None:
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    back = deserialize(serialize(tensor), name="x")
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(
        back.view(-1).view(torch.uint8 if dtype != torch.float32 else torch.int32).view(-1),
        tensor.view(-1).view(torch.uint8 if dtype != torch.float32 else torch.int32).view(-1),
    )


def test_known_bytes() -> None:
    """Little-endian IEEE bytes, row-major: a known-answer check of the layout."""
    message = serialize(torch.tensor([[1.0, -2.0]], dtype=torch.float32))
    assert message.dtype == "float32" and list(message.shape) == [1, 2]
    assert message.data == bytes.fromhex("0000803f000000c0")
    assert serialize(torch.tensor([1.0], dtype=torch.bfloat16)).data == bytes.fromhex("803f")


def test_wire_dtype_casts() -> None:
    message = serialize(torch.ones(2, 3), wire_dtype=torch.bfloat16)
    assert message.dtype == "bfloat16" and len(message.data) == 12


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (pb.Tensor(dtype="int64", shape=[1], data=b"\0" * 8), "dtype 'int64' is not allowed"),
        (pb.Tensor(dtype="pickle", shape=[1], data=b"\x80\x04"), "not allowed"),
        (pb.Tensor(dtype="float32", shape=[1, 2, 4], data=b"\0" * 31), "truncated"),
        (pb.Tensor(dtype="float32", shape=[1, 2, 4], data=b"\0" * 33), "truncated or padded"),
        (pb.Tensor(dtype="float32", shape=[-1, 1, 4], data=b""), "negative dimension"),
        (
            pb.Tensor(dtype="float32", shape=[1, 2, 5], data=b"\0" * 40),
            r"does not match the expected \(\*, \*, 4\)",
        ),
        (pb.Tensor(dtype="float32", shape=[4], data=b"\0" * 16), "does not match"),
    ],
)
def test_malformed_tensors_are_rejected(message: pb.Tensor, match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        deserialize(message, name="hidden", shape=(None, None, 4))


def test_element_limit() -> None:
    with pytest.raises(BadRequestError, match="exceed the limit"):
        deserialize(serialize(torch.zeros(10, 10)), name="x", max_elements=99)
