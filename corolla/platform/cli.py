"""`platform`: the command line. Errors become one line on stderr and a stable exit code.

Exit codes (docs/cli.md has the same table, with examples):

    0    success
    1    unexpected Corolla error; an operating-system error (a file that cannot be read or
         written), in one line naming the file
    2    usage: a flag's value out of range (`--port 99999`, `--days -5`), flags that need or
         exclude each other (`train --test-data` without `--data`); one line, no usage text
    3    inference
    4    model: a checkpoint missing, truncated, with a bad header, a tensor of the wrong shape
         or a config field out of range; `model init-tiny` into an unwritable path or over an
         existing checkpoint without --force
    5    routing
    6    discovery
    7    local launch: a process failed to start, a port already in use
    8    PKI/workspace: a missing or garbage key or certificate file, this node's own
         certificate expired, not yet valid or revoked, a node of the wrong role
    9    access denied
    10   Flower federation
    11   privacy budget exhausted, a site refused
    12   secure aggregation
    13   verification/ledger
    14   ledger does not verify (tampered)
    15   device: --device cuda without CUDA, a dtype the device cannot compute in
    130  interrupted
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from corolla.errors import CorollaError
from corolla.platform import node_config
from corolla.platform.commands import audit, config, generate, keys, model, serve, swarm, train


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr (exit 2), naming the flag and the value."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="platform", description="Corolla: a consortium's shared language model")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument(
        "--config", metavar="FILE", help=f"this node's corolla.toml (default: ${node_config.ENV}); flags override it"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (keys, model, serve, swarm, generate, train, audit, config):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        found = node_config.NodeConfig.find(_config_flag(words))
        if found is not None:
            node_config.apply(parser, words, found)
    except CorollaError as exc:  # the file is read before the command runs: its errors are usage errors
        print(f"platform: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(words)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except CorollaError as exc:
        print(f"platform {args.command}: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file or socket the operator named: one line naming it, not a traceback
        print(f"platform {args.command}: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _config_flag(words: Sequence[str]) -> str | None:
    """`--config FILE` (or `--config=FILE`) before the command, without parsing the rest."""
    for index, word in enumerate(words):
        if not word.startswith("-"):
            return None  # the command: global flags come before it
        if word.startswith("--config="):
            return word.split("=", 1)[1]
        if word == "--config" and index + 1 < len(words):
            return words[index + 1]
    return None


def _one_line(message: str) -> str:
    """An error message as one line: a message that quotes a multi-line cause stays one line."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
