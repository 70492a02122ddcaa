"""`platform config show COMMAND` and `platform config check FILE`: the node's `corolla.toml`
(corolla/platform/node_config.py), as each command sees it."""

from __future__ import annotations

import argparse

from corolla.platform.node_config import ConfigError, NodeConfig, check_all, command_path, explicit_flags, settings_for


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    config = sub.add_parser("config", help="the node's corolla.toml: effective settings, validation")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show",
        help="each setting of a command, its effective value and where it came from",
        description="Example: platform --config /etc/corolla/corolla.toml config show serve --port 4000",
    )
    show.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND [FLAGS]", help="e.g. serve, or audit report")
    show.set_defaults(run=run_show)
    check = config_sub.add_parser("check", help="validate a corolla.toml against every command")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=run_check)


def run_show(args: argparse.Namespace) -> int:
    from corolla.platform.cli import build_parser  # the whole parser: config show is about the others

    parser = build_parser()
    path, sub = command_path(parser, args.words)
    if not path or path[0] == "config":
        raise ConfigError("name a command: platform config show serve (or: audit report, swarm status, ...)")
    config = NodeConfig.find(args.config)
    from_file = settings_for(config, path, sub) if config is not None else {}
    flags = explicit_flags(sub, args.words[len(path) :])
    print(f"platform {' '.join(path)}" + (f"  (config: {config.path})" if config else "  (no config file)"))
    for action in sub._actions:
        if not action.option_strings or action.dest in ("help", argparse.SUPPRESS) or action.help == argparse.SUPPRESS:
            continue
        dest = action.dest
        if dest in flags:
            value, source = flags[dest], "flag"
        elif dest in from_file:
            setting = from_file[dest]
            value, source = setting.value, f"{config.path if config else ''} [{setting.table}] {setting.key}"
        else:
            value, source = action.default, "default"
        print(f"  {action.option_strings[-1]:<24} {value!s:<40} {source}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from corolla.platform.cli import build_parser

    config = NodeConfig.load(args.file)
    checked = check_all(build_parser(), config)
    role = f"role {config.role}, " if config.role else ""
    print(f"{config.path}: valid ({role}settings for: {', '.join(checked) or 'no command tables'})")
    return 0
