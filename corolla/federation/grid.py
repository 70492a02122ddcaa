"""The coordinator's view of the sites: Flower's `Grid`, or an in-process one.

`run_rounds` needs two things of a grid: the nodes online, and sending messages and
receiving what comes back (`Exchange`). Flower's `Grid` (the deployment engine's, in a
ServerApp) has them; so has `InProcessGrid`, which hands each message to a site's handler
in this process, as `platform train --in-process` does: the same round loop, records and
checks, without SuperLink, SuperNodes or the swarm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from flwr.app import Context, Message
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["Exchange", "InProcessGrid", "InProcessSite"]

COORDINATOR_NODE = 0  # the node id a ServerApp's messages come from


class Exchange(Protocol):
    """What the round loop uses of a grid (flwr's `Grid` has it)."""

    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class InProcessSite:
    """A site run in this process: its Flower context and its ClientApp's body."""

    context: Context
    handle: Callable[[Message, Context], Message]  # the site's reply (content or error) to a message


class InProcessGrid:
    """Delivers each message to its site's handler in turn and returns the replies, with
    message ids and `reply_to` set as flwr's SuperLink sets them.

    Flower's messages read the sender's run and node from the process's task identity; a
    ServerApp process has it set by Flower, so this grid sets it for its own process."""

    def __init__(self, sites: Mapping[int, InProcessSite], *, run_id: int) -> None:
        if COORDINATOR_NODE in sites:
            raise ValueError(f"node id {COORDINATOR_NODE} is the coordinator's")
        self.sites = dict(sites)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = COORDINATOR_NODE
        TaskIdentity.task_id = 1

    def get_node_ids(self) -> list[int]:
        return sorted(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink does on push
            site = self.sites.get(message.metadata.dst_node_id)
            if site is None:
                continue  # no such node: no reply, as for a node that never answers
            reply = site.handle(message, site.context)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            replies.append(reply)
        return replies
