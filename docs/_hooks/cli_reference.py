"""MkDocs hook: the CLI reference page, generated from `platform`'s own argparse parser at
build time, so that it can never drift from the code (`docs/reference/cli.md` holds only a
marker)."""

from __future__ import annotations

import argparse
from typing import Any

MARKER = "<!-- cli-reference -->"


def _walk(parser: argparse.ArgumentParser, path: list[str]) -> list[tuple[list[str], argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.extend(_walk(child, [*path, name]))
    return found


def render() -> str:
    from corolla.platform.cli import build_parser

    parser = build_parser()
    parser.prog = "platform"
    sections = []
    for path, sub in _walk(parser, []):
        if not path:
            continue
        sub.prog = " ".join(["platform", *path])
        help_text = sub.format_help().replace("```", "'''")
        sections.append(f"{'#' * min(len(path) + 1, 4)} `platform {' '.join(path)}`\n\n```text\n{help_text}```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
