"""Verification: spot checks, tolerances, reputation, the ledger and audit reports.

Importing the package is cheap: the spot checker (which needs torch and the inference
client) is imported on first use of one of its names.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corolla.verify.spot_check import SpotChecker, SpotCheckSettings, SpotCheckStats

__all__ = ["SpotCheckSettings", "SpotCheckStats", "SpotChecker"]

_LAZY = {name: "corolla.verify.spot_check" for name in ("SpotCheckSettings", "SpotCheckStats", "SpotChecker")}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corolla.verify' has no attribute {name!r}")
    return getattr(import_module(module), name)
