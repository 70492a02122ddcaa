"""Stepping a stream until the server ends it, shared by the revocation tests."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from corolla.inference.errors import AccessDeniedError


def seconds_until_refused(session: Any, token: torch.Tensor, *, limit: float, match: str) -> float:
    """Step `session` (position 0 again and again: rewinding is allowed) until the server ends
    the stream with `AccessDeniedError` matching `match`; how many seconds that took."""
    began = time.monotonic()
    with pytest.raises(AccessDeniedError, match=match):
        while time.monotonic() - began < limit:
            session.step(token, 0)
    return time.monotonic() - began
