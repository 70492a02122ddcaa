"""`corolla.toml`: one file per node, read by every command; flags override it.

    [node]                      # settings any command takes where it has the flag
    role = "server"             # bootstrap | server | site | coordinator | client (documentation and checks)
    workspace = "/var/lib/corolla"
    node = "server-a"           # --node: this node's identity in the workspace
    model = "/models/smollm2"
    peers = ["/ip4/10.0.0.2/tcp/31338/p2p/12D3..."]
    ledger = "postgresql://corolla@db/ledger"

    [serve]                     # one table per command (`[swarm.bootstrap]` for a subcommand)
    blocks = "0:15"
    port = 31337

A key is a flag's name without the dashes (`max-sessions` or `max_sessions`). `[node]` keys
apply to every command that has the flag; a command's own table overrides them; a flag on
the command line overrides both. Every value goes through the same parsing and checks as
the flag (its type, its choices), so `port = "http"` fails as `--port http` would, naming the
file, the table and the key. The file is found by `--config FILE` (before the command),
else `$COROLLA_CONFIG`; with neither, no file is read.

`platform config show COMMAND` prints each setting of COMMAND, its effective value and where
it came from; `platform config check FILE` validates a file against every command.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from corolla.errors import CorollaError

ENV = "COROLLA_CONFIG"
Scalar = str | int | float | bool
Value = Scalar | list[Scalar]


class ConfigError(CorollaError):
    """`corolla.toml` is missing, not TOML, or has a key or value no command accepts."""

    exit_code = 2  # a usage error: the same code the flag itself would give


@dataclass(frozen=True, slots=True)
class Setting:
    value: Any  # parsed as the flag would parse it
    table: str  # "node", "serve", "audit", "audit.report"
    key: str  # as written, with dashes


class _NodeTable(BaseModel):
    """The typed part of `[node]`; other keys are flags of some command (checked per command)."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["bootstrap", "server", "site", "coordinator", "client"] | None = None


class _File(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    node: _NodeTable = _NodeTable()


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeConfig:
    path: Path
    node: Mapping[str, Value]  # [node] without `role`
    role: str | None
    tables: Mapping[str, Mapping[str, Value]]  # "serve", "swarm.bootstrap", ...

    @classmethod
    def load(cls, path: str | Path) -> NodeConfig:
        file = Path(path).expanduser()
        try:
            raw = tomllib.loads(file.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {str(file)!r} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {str(file)!r}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
        try:
            parsed = _File.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(
                f"{file}: [{where.rsplit('.', 1)[0]}] {where.rsplit('.', 1)[-1]}: {first['msg']}"
            ) from exc
        node = {_key(k): v for k, v in (parsed.node.model_extra or {}).items()}
        tables: dict[str, dict[str, Value]] = {}
        for name, table in (parsed.model_extra or {}).items():
            _flatten(file, name, table, tables)
        for where, table in [("node", node), *tables.items()]:
            for key, value in table.items():
                _check_value(file, where, key, value)
        return cls(path=file, node=node, role=parsed.node.role, tables=tables)

    @classmethod
    def find(cls, explicit: str | None) -> NodeConfig | None:
        chosen = explicit or os.environ.get(ENV)
        return cls.load(chosen) if chosen else None


def _flatten(file: Path, name: str, table: object, out: dict[str, dict[str, Value]]) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: {name!r} must be a table ([{name}]), not a value")
    values: dict[str, Value] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(file, f"{name}.{key}", value, out)
        else:
            values[_key(key)] = value
    if values:
        out[name] = values


def _check_value(file: Path, where: str, key: str, value: object) -> None:
    ok = isinstance(value, (str, int, float, bool)) or (
        isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value)
    )
    if not ok:
        raise ConfigError(f"{file}: [{where}] {key}: {value!r} is not a string, number, boolean or list of them")


def _key(name: str) -> str:
    return name.replace("-", "_")


# -- applying a file to a parsed command ---------------------------------------------------------


def command_path(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The subcommand names in `argv` and the parser of the innermost one."""
    path: list[str] = []
    current = parser
    rest = list(argv)
    while True:
        sub = _subparsers(current)
        if sub is None:
            return path, current
        chosen = next((word for word in rest if word in sub.choices), None)
        if chosen is None:
            return path, current
        path.append(chosen)
        current = sub.choices[chosen]
        rest = rest[rest.index(chosen) + 1 :]


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest in (argparse.SUPPRESS, "help") or isinstance(a, argparse._SubParsersAction) or not a.option_strings:
            continue
        if getattr(a, "deprecated", False) is True and a.dest in out:
            continue  # an old spelling (`add_renamed`): the new one names the setting
        out[a.dest] = a
    return out


def settings_for(config: NodeConfig, path: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, Setting]:
    """The values `config` gives the command at `path`, by dest; later tables win."""
    actions = _actions(parser)
    out: dict[str, Setting] = {}
    for key, value in config.node.items():
        if key in actions:
            out[key] = Setting(_convert(config.path, "node", key, value, actions[key]), "node", key.replace("_", "-"))
    tables = [".".join(path[: i + 1]) for i in range(len(path))]  # "audit", then "audit.report"
    for name in tables:
        for key, value in config.tables.get(name, {}).items():
            if key not in actions:
                # A key of a group table ([audit]) that this subcommand lacks belongs to a
                # sibling (`check_all` makes sure some subcommand takes it).
                if name == tables[-1]:
                    flags = ", ".join(sorted(k.replace("_", "-") for k in actions)) or "none"
                    raise ConfigError(
                        f"{config.path}: [{name}] {key.replace('_', '-')}: `platform {' '.join(path)}` has no such "
                        f"setting (it takes: {flags})"
                    )
                continue
            out[key] = Setting(_convert(config.path, name, key, value, actions[key]), name, key.replace("_", "-"))
    return out


def _convert(file: Path, table: str, key: str, value: Value, action: argparse.Action) -> Any:
    where = f"{file}: [{table}] {key.replace('_', '-')}"
    if action.nargs == 0:  # a switch: store_true, store_false, a renamed switch
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} must be true or false")
        return action.const if value else action.default
    items = value if isinstance(value, list) else [value]
    if isinstance(action, argparse._AppendAction) or getattr(action, "append", False) or action.nargs in ("+", "*"):
        return [_one(where, item, action) for item in items]
    if isinstance(value, list):
        raise ConfigError(f"{where}: takes one value, not a list")
    return _one(where, value, action)


def _one(where: str, value: Scalar, action: argparse.Action) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not a value this setting takes")
    text = str(value)
    converted: Any = text
    if action.type is not None and callable(action.type):
        try:
            converted = action.type(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {value!r} is not valid: {exc}") from exc
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(str(c) for c in action.choices)
        raise ConfigError(f"{where}: {value!r} is not one of {allowed}")
    return converted


def apply(parser: argparse.ArgumentParser, argv: Sequence[str], config: NodeConfig) -> None:
    """Make the file's values the defaults of the command in `argv`, so flags override them."""
    path, sub = command_path(parser, argv)
    values = settings_for(config, path, sub)
    actions = _actions(sub)
    for dest in values:
        actions[dest].required = False  # a required flag (`serve --model`) the file gives
    sub.set_defaults(**{dest: setting.value for dest, setting in values.items()})


def explicit_flags(sub: argparse.ArgumentParser, words: Sequence[str]) -> dict[str, str]:
    """The dests that `words` set on the command line, with the text given (for `config show`)."""
    actions = _actions(sub)
    strings = {s: dest for dest, a in actions.items() for s in a.option_strings}
    given: dict[str, str] = {}
    for index, word in enumerate(words):
        flag, eq, inline = word.partition("=")
        if flag not in strings:
            continue
        action = actions[strings[flag]]
        if eq:
            given[strings[flag]] = inline
        elif action.nargs == 0:
            given[strings[flag]] = "true"
        else:
            given[strings[flag]] = words[index + 1] if index + 1 < len(words) else ""
    return given


def check_all(parser: argparse.ArgumentParser, config: NodeConfig) -> list[str]:
    """Validate every table of `config` against its command(s); the commands checked."""
    commands = {".".join(path): (path, sub) for path, sub in _commands(parser, [])}
    leaves = {name: entry for name, entry in commands.items() if _subparsers(entry[1]) is None}
    every_dest = {dest for _path, sub in leaves.values() for dest in _actions(sub)}
    for key in config.node:
        if key not in every_dest:
            raise ConfigError(f"{config.path}: [node] {key.replace('_', '-')}: no command has such a setting")
    for name, table in config.tables.items():
        if name not in commands:
            known = ", ".join(sorted(n for n in commands if n))
            raise ConfigError(f"{config.path}: [{name}] is not a command (tables: node, {known})")
        below = [sub for leaf, (_p, sub) in leaves.items() if leaf == name or leaf.startswith(name + ".")]
        for key in table:
            if not any(key in _actions(sub) for sub in below):
                raise ConfigError(
                    f"{config.path}: [{name}] {key.replace('_', '-')}: `platform {name.replace('.', ' ')}` "
                    "has no such setting"
                )
    checked = []
    for name, (path, sub) in leaves.items():
        settings_for(config, path, sub)  # converts every value as its flag would
        if any(".".join(path[: i + 1]) in config.tables for i in range(len(path))):
            checked.append(name)
    return checked


def _commands(parser: argparse.ArgumentParser, path: list[str]) -> list[tuple[list[str], argparse.ArgumentParser]]:
    found = [(path, parser)]
    sub = _subparsers(parser)
    if sub is not None:
        for name, child in sub.choices.items():
            found.extend(_commands(child, [*path, name]))
    return found
