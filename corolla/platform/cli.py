"""`platform`: the command line. Errors become one clear line and a stable exit code.

Exit codes: 0 success, 1 unexpected Corolla error, 2 usage, 3 inference, 4 model
loading, 5 routing, 6 discovery, 7 local launch, 8 PKI/workspace, 9 access denied,
13 verification/ledger, 14 ledger does not verify (tampered), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from corolla.errors import CorollaError
from corolla.platform.commands import audit, generate, keys, model, serve, swarm, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="platform", description="Corolla: a consortium's shared language model")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (keys, model, serve, swarm, generate, train, audit):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except CorollaError as exc:
        print(f"platform {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
