"""A real `platform serve` process stops promptly on SIGTERM, with its sessions closed.

Two servers (blocks 0:2, the DHT bootstrap peer, and 2:4) serve a client whose
inference session is open on both. Each gets SIGTERM in turn, while the session is
still open: each must exit 0 within 2 s, saying it closed that session.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from corolla.inference.client import RemoteModelForCausalLM
from corolla.platform.launch.servers import LocalServers, ServerProcess

pytestmark = pytest.mark.e2e

EXIT_WITHIN_S = 2.0


def _terminate(server: ServerProcess) -> tuple[float, int]:
    """SIGTERM `server`; (seconds until it exited, its exit code)."""
    began = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=30)
    return time.monotonic() - began, code


def _stopped_line(server: ServerProcess) -> str:
    deadline = time.monotonic() + 5.0  # stderr is drained by a thread
    while time.monotonic() < deadline:
        lines = [line for line in server.output if line.startswith("stopped:")]
        if lines:
            return lines[-1].strip()
        time.sleep(0.05)
    return "".join(server.output[-15:])


def test_sigterm_stops_a_server_within_2s_with_its_sessions_closed(tiny_llama: Path) -> None:
    with (
        LocalServers(tiny_llama, [(0, 2), (2, 4)], torch_threads=1) as swarm,
        RemoteModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers) as model,
    ):
        session = model.inference_session(max_length=16)
        try:
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, session=session)
            assert {h.endpoint for h in session.route} == set(swarm.endpoints)
            for server in reversed(swarm.servers):  # the bootstrap peer last: it has the most peers
                took, code = _terminate(server)
                said = _stopped_line(server)
                assert code == 0, f"exit code {code}: {''.join(server.output[-20:])}"
                assert took < EXIT_WITHIN_S, f"took {took:.2f} s to exit: {said}"
                assert said.startswith("stopped: closed 1 open session(s) (0 left)"), said
        finally:
            session.close()
