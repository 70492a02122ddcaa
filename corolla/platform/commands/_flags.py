"""The flag words the `platform` commands share, and the old spellings that still work.

One flag name has one meaning in every command (tests/platform/test_cli_words.py checks it):

    --model DIR            a checkpoint directory      --model-id ID       the id it is announced under
    --servers HOST:PORT    block server endpoints      --local-servers N   block servers a local swarm starts
    --peers MULTIADDR      DHT peers to join           --adapter-dir DIR   a trained adapter's directory
    --port N               gRPC port                   --dht-port N        libp2p port
    --host ADDR            listen address              --san HOST          extra name in a TLS certificate
    --out-dir DIR          a directory to write        --out FILE          a file to write

and `train --adapter KIND` is an adapter kind (lora). A renamed flag keeps its old spelling
for now (`add_renamed`): the old one still parses, says `warning: OLD is deprecated; use NEW`
once on stderr, and given together with the new spelling is a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Renamed", "add_renamed", "endpoint", "server_count"]

_SPELLINGS = "_flag_spellings"  # namespace attribute: dest -> the spelling that set it in this command line


class Renamed(argparse.Action):
    """A flag with old spellings, new or old: stores (`append`: appends; `nargs=0`: stores
    `const`) like argparse's own actions. An old spelling warns once on stderr; two spellings
    of one flag in one command line are a usage error."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, *, new: str, append: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new
        self.append = append

    @property
    def deprecated(self) -> bool:
        """True for an old spelling (it is hidden from --help)."""
        return self.new not in self.option_strings

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        spelling = option_string or self.new
        spellings: dict[str, str] | None = getattr(namespace, _SPELLINGS, None)
        if spellings is None:
            spellings = {}
            setattr(namespace, _SPELLINGS, spellings)
        first = spellings.get(self.dest)
        if first is None:
            spellings[self.dest] = spelling
            if self.deprecated:  # once: a repeatable flag may be given many times
                shown = f" {self.metavar}" if self.nargs != 0 else ""
                print(f"warning: {spelling}{shown} is deprecated; use {self.new}{shown}", file=sys.stderr, flush=True)
        elif first != spelling:
            parser.error(f"{first} and {spelling} are two spellings of one flag: give {self.new} only")
        value = self.const if self.nargs == 0 else values
        if self.append:
            setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), value])
        else:
            setattr(namespace, self.dest, value)


def add_renamed(
    container: argparse._ActionsContainer,
    new: str,
    *old: str,
    old_type: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> argparse.Action:
    """Add the flag `new` (argparse's keywords; `action` "store", "append" or "store_true") and its
    deprecated spellings `old`, hidden from --help and named in `new`'s help. `old_type`
    converts an old spelling's value where it differs (`--servers N`: a count, see
    `server_count`). Returns `new`'s action."""
    kind = kwargs.pop("action", "store")
    if kind == "store_true":
        kwargs.update(nargs=0, const=True)
        kwargs.setdefault("default", False)
    elif kind not in ("store", "append"):
        raise ValueError(f"add_renamed({new!r}): action={kind!r} is not store, append or store_true")
    if not old:
        raise ValueError(f"add_renamed({new!r}): no old spelling given")
    if kind != "store_true" and "metavar" not in kwargs:
        raise ValueError(f"add_renamed({new!r}): give a metavar (the deprecation warning shows it)")
    if kwargs.get("help") not in (None, argparse.SUPPRESS):
        kwargs["help"] += f" (old spelling {' / '.join(old)}: still works, deprecated)"
    append = kind == "append"
    action = container.add_argument(new, action=Renamed, new=new, append=append, **kwargs)
    same: dict[str, Any] = {  # what the old spelling takes: what `new` takes, `old_type` aside
        "dest": action.dest,
        "nargs": action.nargs,
        "const": action.const,
        "type": old_type or action.type,
        "choices": action.choices,
        "metavar": action.metavar,
    }
    for spelling in old:
        # default SUPPRESS: `new` sets the default; help SUPPRESS: `new`'s help names the old spelling
        container.add_argument(
            spelling, action=Renamed, new=new, append=append, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **same
        )
    return action


def endpoint(text: str) -> str:
    """`--servers HOST:PORT`: one block server's endpoint. A bare number is refused: it is a
    count of servers to start, `--local-servers N` (the old `train --servers N`)."""
    if text.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"{text} is a count, not an endpoint HOST:PORT (to start {text.strip()} local block servers: "
            f"--local-servers {text.strip()})"
        )
    return text


def server_count(text: str) -> int:
    """The old `--servers N` of a command that starts its own block servers: decided by the
    value's form, a number is the count (`--local-servers N`), an endpoint is refused."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"{text}: here --servers is the old spelling of --local-servers N, a count of block servers to "
            "start; this command takes no server endpoints"
        )
    return int(text)
