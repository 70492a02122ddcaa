"""Key/value settings in the form `flwr run --run-config` and `flower-supernode --node-config` parse.

Flower reads each `key=value` pair as one TOML line, splitting pairs at whitespace unless
the value is quoted; strings therefore go in TOML literal quotes ('...'), which have no
escapes, so a value holding a quote or a newline cannot be written and is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from corolla.platform.flower.errors import FederationError

UserConfigValue = bool | int | float | str

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_user_config(values: Mapping[str, UserConfigValue], *, field: str) -> str:
    """`values` as Flower's space-separated `key=value` string; `field` names the setting in errors."""
    return " ".join(f"{key}={_format_value(key, value, field=field)}" for key, value in _checked(values, field))


def _checked(values: Mapping[str, UserConfigValue], field: str) -> list[tuple[str, UserConfigValue]]:
    items = list(values.items())
    for key, _ in items:
        if not isinstance(key, str) or not _BARE_KEY.fullmatch(key):
            raise FederationError(f"{field}: key {key!r} is not allowed; use letters, digits, '_' and '-'")
    return items


def _format_value(key: str, value: UserConfigValue, *, field: str) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FederationError(f"{field}[{key!r}] = {value!r}: only finite floats are allowed")
        return repr(value)
    if isinstance(value, str):
        if "'" in value or "\n" in value or "\r" in value:
            raise FederationError(f"{field}[{key!r}] = {value!r}: strings may not contain a quote (') or a newline")
        return f"'{value}'"
    raise FederationError(f"{field}[{key!r}] = {value!r}: allowed types are bool, int, float and str")
