"""The `platform` vocabulary: one flag name, one meaning in every command; renamed flags keep
their old spelling for now, with a deprecation warning (corolla/platform/commands/_flags.py)."""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import pytest

from corolla.platform.cli import build_parser, main
from corolla.platform.commands._flags import Renamed


@dataclass(frozen=True)
class Rename:
    command: str  # e.g. "swarm bootstrap"
    required: str  # the command's other required flags
    new: str  # the spelling to use
    old: str  # the deprecated one
    value: str | None  # None: a switch
    dest: str
    parsed: Any  # what the value parses to

    def argv(self, flag: str) -> list[str]:
        return _argv(self.command, self.required, flag, self.value)


RENAMED = [
    Rename("generate", "", "--adapter-dir", "--adapter", "out/adapter", "adapter_dir", "out/adapter"),
    Rename("train", "", "--local-servers", "--servers", "3", "local_servers", 3),
    Rename("train", "", "--out-dir", "--out", "runs/a", "out_dir", Path("runs/a")),
    Rename("train", "", "--in-process", "--local", None, "in_process", True),
    Rename("serve", "--model m", "--peers", "--bootstrap", "/ip4/10.0.0.1/tcp/1", "peers", ["/ip4/10.0.0.1/tcp/1"]),
    Rename("swarm bootstrap", "", "--peers", "--bootstrap", "/ip4/10.0.0.1/tcp/1", "peers", ["/ip4/10.0.0.1/tcp/1"]),
    Rename("swarm bootstrap", "", "--dht-port", "--port", "31337", "dht_port", 31337),
    Rename("keys issue", "--role site --name a", "--san", "--host", "10.0.0.2", "san", ["10.0.0.2"]),
    Rename("audit readmit", "node-x --reason r --blocks 0:2", "--model-id", "--model", "m", "model_id", "m"),
]
IDS = [f"{r.command} {r.old}" for r in RENAMED]


def _argv(command: str, required: str, flag: str, value: str | None) -> list[str]:
    return [*command.split(), *required.split(), flag, *([value] if value is not None else [])]


@pytest.mark.parametrize("rename", RENAMED, ids=IDS)
def test_each_new_flag_works_without_a_warning(capsys: pytest.CaptureFixture[str], rename: Rename) -> None:
    args = build_parser().parse_args(rename.argv(rename.new))
    assert getattr(args, rename.dest) == rename.parsed
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("rename", RENAMED, ids=IDS)
def test_each_old_spelling_still_works_and_says_once_it_is_deprecated(
    capsys: pytest.CaptureFixture[str], rename: Rename
) -> None:
    command, _, new, old, value, dest, parsed = astuple(rename)
    argv = rename.argv(old)
    if isinstance(parsed, list):  # a repeatable flag given twice: still one warning
        argv += [old, str(value)]
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == (parsed * 2 if isinstance(parsed, list) else parsed)
    metavar = "" if value is None else f" {_parsers()[command]._option_string_actions[new].metavar}"
    assert capsys.readouterr().err == f"warning: {old}{metavar} is deprecated; use {new}{metavar}\n"


def test_the_warning_reads_as_the_issue_asks(capsys: pytest.CaptureFixture[str]) -> None:
    build_parser().parse_args(["train", "--servers", "3"])
    assert capsys.readouterr().err == "warning: --servers N is deprecated; use --local-servers N\n"


@pytest.mark.parametrize("rename", RENAMED, ids=IDS)
def test_old_and_new_spelling_together_is_a_usage_error(capsys: pytest.CaptureFixture[str], rename: Rename) -> None:
    new, old, value = rename.new, rename.old, rename.value
    extra = [] if value is None else [value]
    for first, second in ((old, new), (new, old)):
        with pytest.raises(SystemExit) as exited:
            main([*rename.argv(first), second, *extra])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        # --in-process and --local also sit in train's --superlink group: argparse's own message then.
        assert f"{first} and {second} are two spellings of one flag: give {new} only" in err or (
            f"argument {second}: not allowed with argument {first}" in err
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--servers", "127.0.0.1:5000"],
            "127.0.0.1:5000: here --servers is the old spelling of --local-servers N, a count of block servers",
        ),
        (
            ["generate", "--servers", "3"],
            "3 is a count, not an endpoint HOST:PORT (to start 3 local block servers: --local-servers 3)",
        ),
    ],
)
def test_servers_is_decided_by_the_value_form(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """`--servers` means endpoints; the old `train --servers N` is told apart by its value."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_servers_still_takes_endpoints(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["generate", "--servers", "10.0.0.1:5000", "--servers", "[::1]:5001"])
    assert args.servers == ["10.0.0.1:5000", "[::1]:5001"] and args.local_servers == 2
    assert capsys.readouterr().err == ""


def test_the_headline_command_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["train", "--adapter", "lora", "--dp-epsilon", "3"])
    assert (args.adapter, args.dp_epsilon) == ("lora", 3.0)
    assert capsys.readouterr().err == ""


# -- the vocabulary table ------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path or "platform", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}".strip())


def _parsers() -> dict[str, argparse.ArgumentParser]:
    return dict(_commands(build_parser()))


def _kind(action: argparse.Action) -> str:
    if isinstance(action, Renamed):
        return "append" if action.append else ("switch" if action.nargs == 0 else "store")
    kinds: dict[type[argparse.Action], str] = {
        argparse._StoreAction: "store",
        argparse._AppendAction: "append",
        argparse._StoreTrueAction: "switch",
        argparse._CountAction: "count",
    }
    return kinds[type(action)]


def _meaning(action: argparse.Action) -> tuple[str, str | None, str, str, tuple[str, ...]]:
    """What a flag takes: its dest, metavar, value type, store/append/switch, choices. A Path is
    text to the user (the metavar says DIR or FILE), so it counts as str."""
    value_type = getattr(action.type, "__qualname__", "str") if action.type not in (None, Path) else "str"
    metavar = action.metavar if isinstance(action.metavar, str) or action.metavar is None else str(action.metavar)
    return action.dest, metavar, value_type, _kind(action), tuple(action.choices or ())


def _vocabulary() -> dict[str, dict[str, tuple[str, str | None, str, str, tuple[str, ...]]]]:
    """option string -> command -> meaning, for every current spelling (old spellings left out)."""
    words: dict[str, dict[str, Any]] = defaultdict(dict)
    for command, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction) or not action.option_strings:
                continue
            if isinstance(action, Renamed) and action.deprecated:
                continue
            for option in action.option_strings:
                words[option][command] = _meaning(action)
    return words


# Same word, knowingly different values: say why here, or rename.
EXCEPTIONS = {
    # Hidden test hook: train says which of its local servers injects (INDEX=KIND:FRACTION).
    ("--inject-fault", "train"): "INDEX=KIND:FRACTION",
}

# The shared words and what they mean wherever they appear: (metavar, value type, kind).
PINNED = {
    "--model": ("DIR", "str", "store"),
    "--model-id": ("ID", "str", "store"),
    "--servers": ("HOST:PORT", "endpoint", "append"),
    "--local-servers": ("N", "int", "store"),
    "--peers": ("MULTIADDR", "str", "append"),
    "--adapter": ("KIND", "str", "store"),
    "--adapter-dir": ("DIR", "str", "store"),
    "--out-dir": ("DIR", "str", "store"),
    "--out": ("FILE", "str", "store"),
    "--ledger": ("URL", "str", "store"),
    "--tolerances": ("FILE", "str", "store"),
    "--port": ("N", "int", "store"),
    "--dht-port": ("N", "int", "store"),
    "--host": ("ADDR", "str", "store"),
    "--blocks": ("START:END", "parse_span", "store"),
    "--seed": ("N", "int", "store"),
}


def test_no_flag_name_has_two_meanings_across_commands() -> None:
    clashes = {}
    for option, by_command in _vocabulary().items():
        meanings = {cmd: m for cmd, m in by_command.items() if (option, cmd) not in EXCEPTIONS}
        if len(set(meanings.values())) > 1:
            clashes[option] = meanings
    assert clashes == {}


@pytest.mark.parametrize("option", sorted(PINNED))
def test_the_shared_words_mean_what_the_table_says(option: str) -> None:
    by_command = _vocabulary()[option]
    assert by_command, f"{option} is in no command"
    for command, (_, metavar, value_type, kind, _) in by_command.items():
        if (option, command) not in EXCEPTIONS:
            assert (metavar, value_type, kind) == PINNED[option], command


def test_every_old_spelling_is_hidden_and_names_a_current_flag_of_its_command() -> None:
    found = set()
    for command, parser in _commands(build_parser()):
        for action in parser._actions:
            if not (isinstance(action, Renamed) and action.deprecated):
                continue
            [old] = action.option_strings
            found.add((command, old))
            new = parser._option_string_actions[action.new]
            assert isinstance(new, Renamed) and not new.deprecated and new.dest == action.dest
            assert action.help == argparse.SUPPRESS
            listed = rf"(?<![\w-]){old}(?![\w-])"  # as a flag of its own, in usage or the option list
            assert not re.search(listed, parser.format_usage())
            assert not re.search(rf"^  {listed}", parser.format_help(), re.MULTILINE)  # help wraps deeper
            assert f"old spelling {old}" in (new.help or "")
    assert found == {(r.command, r.old) for r in RENAMED}  # every alias is tested above
