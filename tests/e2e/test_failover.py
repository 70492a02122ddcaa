"""A server killed with SIGKILL mid-generation does not change the generated tokens.

Real `platform serve` processes found through the DHT: blocks 0:2 on one server, 2:4
on two replicas. After 10 tokens, the replica the session uses is killed; the client
reroutes its blocks to the other replica, replays the history there, and the 32
tokens equal local `generate()`.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.inference.client import RemoteModelForCausalLM
from corolla.platform.launch.servers import LocalServers

pytestmark = pytest.mark.e2e


class _KillAfter:
    """A streamer that kills the server holding `blocks` once `tokens` new tokens came."""

    def __init__(self, swarm: LocalServers, session_route: list, blocks: tuple[int, int], tokens: int) -> None:
        self.swarm, self.route, self.blocks, self.tokens = swarm, session_route, blocks, tokens
        self.seen = -1  # the first put is the prompt
        self.killed: str | None = None

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.tokens and self.killed is None:
            endpoint = next(h.endpoint for h in self.route() if (h.start, h.end) == self.blocks)
            index = self.swarm.endpoints.index(endpoint)
            self.swarm.kill(index, signal.SIGKILL)
            self.killed = endpoint

    def end(self) -> None:
        pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sigkill_mid_generation_keeps_output(arch: str, tiny_llama: Path, tiny_gpt2: Path) -> None:
    model_dir = tiny_llama if arch == "llama" else tiny_gpt2
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(7))
    want = local.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=None)

    with (
        LocalServers(model_dir, [(0, 2), (2, 4), (2, 4)], torch_threads=1) as swarm,
        RemoteModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers) as model,
    ):
        session = model.inference_session(max_length=6 + 32, batch_size=2)
        killer = _KillAfter(swarm, lambda: session.route, (2, 4), tokens=10)
        got = model.generate(prompt, max_new_tokens=32, eos_token_id=None, streamer=killer, session=session)
        route_after = [h.endpoint for h in session.route]
        session.close()

    assert killer.killed is not None, "the test never killed a server"
    assert killer.killed not in route_after, "the session still routes to the killed server"
    assert torch.equal(got, want)


def test_parallel_forward_retries_on_replica(tiny_llama: Path) -> None:
    """A forward whose server was killed is retried on the replica with the same result."""
    local = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(8))
    with (
        LocalServers(tiny_llama, [(0, 4), (0, 4)], torch_threads=1) as swarm,
        RemoteModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers) as model,
    ):
        model.swarm.router.jitter = 0.0  # the same server is preferred every time
        with torch.no_grad():
            hidden = model.client_parts.embed(ids)
            first, trace = model.blocks.forward_with_trace(hidden, 0, 4)
            used, used_node = trace[0][0].endpoint, trace[0][0].node_id
            swarm.kill(swarm.endpoints.index(used), signal.SIGKILL)
            second, trace = model.blocks.forward_with_trace(hidden, 0, 4)
        assert model.swarm.router.bans.is_banned(used_node), "the dead server was never tried"
        assert trace[0][0].endpoint != used
        want = local.model(ids).last_hidden_state.detach()
    # the local model applies the final norm to its last hidden state; compare through it
    norm = local.model.norm
    torch.testing.assert_close(norm(first), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(norm(second), want, rtol=0, atol=1e-5)
