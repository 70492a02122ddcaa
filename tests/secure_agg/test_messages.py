"""Frames: the chunk-by-chunk writer builds exactly what `pack` builds, and refuses misuse."""

from __future__ import annotations

import numpy as np
import pytest

from corolla.secure_agg.messages import FrameWriter, Kind, pack, unpack


def test_frame_writer_equals_pack() -> None:
    header, signature = b'{"a": 1}', bytes(range(64))
    payload = np.arange(1000, dtype="<u4")
    writer = FrameWriter(Kind.UPLOAD, header_length=len(header), payload_length=payload.nbytes)
    for start in range(0, payload.size, 300):  # uneven chunks, the last one short
        writer.write(payload[start : start + 300].data.cast("B"))
    frame = writer.finish(header, signature)
    assert isinstance(frame, bytes)
    assert frame == pack(Kind.UPLOAD, header, signature, payload.data.cast("B"))
    parsed = unpack(frame, expect=Kind.UPLOAD)
    assert parsed.header == header and parsed.signature == signature
    assert np.array_equal(np.frombuffer(parsed.payload, dtype="<u4"), payload)


def test_frame_writer_refuses_a_wrong_length() -> None:
    chunk = memoryview(bytes(8))
    writer = FrameWriter(Kind.UPLOAD, header_length=2, payload_length=8)
    with pytest.raises(ValueError, match="shorter than announced"):
        writer.finish(b"{}", bytes(64))
    writer.write(chunk)
    with pytest.raises(ValueError, match="longer than announced"):
        writer.write(memoryview(b"x"))
    with pytest.raises(ValueError, match="expected a header of 2 bytes"):
        writer.finish(b"{ }", bytes(64))
    assert writer.finish(b"{}", bytes(64)).endswith(bytes(8))
