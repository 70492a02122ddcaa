"""A server killed with SIGKILL mid-step: the step is retried on a replica, same result.

Real `platform serve` processes: blocks 0:2 on one server, 2:4 on two replicas. The
server the step used for 2:4 is killed after the forward (before the backward), or,
with flat clipping, after the norms (before the clipped sums); the client bans it,
redoes that part on the replica, and the adapter after the step equals a step with no
failure (fp32, rtol=0).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM
from corolla.platform.launch.servers import LocalServers
from corolla.training.clinical import synthetic_clinical
from corolla.training.data import encode
from corolla.training.remote_trainer import RemoteTrainer

pytestmark = pytest.mark.e2e


def _step(model: RemoteModelForCausalLM, start: LoraAdapter, batch, exchange: str) -> dict[str, torch.Tensor]:
    adapter = LoraAdapter(start.checkpoint, start.settings, start.state())
    trainer = RemoteTrainer(
        model,
        adapter,
        lr=1.0,
        exchange=exchange,
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        expected_batch_size=4,
        optimizer="sgd",
    )
    trainer.step(batch)
    return adapter.state()


@pytest.mark.parametrize("exchange", ["per-sample", "flat"])
def test_server_killed_mid_step_is_replaced_with_the_same_result(tiny_llama: Path, exchange: str) -> None:
    data = synthetic_clinical(sites=1, records_per_site=4, test_records=0, seed=2)
    batch = encode(list(data.sites[0]), AutoTokenizer.from_pretrained(tiny_llama), max_length=192)
    with (
        LocalServers(tiny_llama, [(0, 2), (2, 4), (2, 4)], torch_threads=1) as swarm,
        RemoteModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers) as model,
    ):
        model.swarm.router.jitter = 0.0
        start = LoraAdapter.init(model.checkpoint, LoraSettings(r=4, targets=("q_proj", "v_proj", "down_proj")))
        with torch.no_grad():
            for name, p in start.named_weights():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        want = _step(model, start, batch, exchange)

        blocks = model.blocks
        killed: list[str] = []

        def kill_server_of_hop(endpoint: str) -> None:
            if not killed:
                swarm.kill(swarm.endpoints.index(endpoint), signal.SIGKILL)
                killed.append(endpoint)

        if exchange == "per-sample":  # killed between the forward and the backward
            original = blocks.backward_through

            def backward_through(trace, grad, **kwargs):  # type: ignore[no-untyped-def]
                kill_server_of_hop(next(h.endpoint for h, _ in trace if (h.start, h.end) == (2, 4)))
                return original(trace, grad, **kwargs)

            blocks.backward_through = backward_through  # type: ignore[method-assign]
        else:  # killed after it returned the norms, before the clipped sums
            original_sums = blocks.clip_sums

            def clip_sums(parts, factors):  # type: ignore[no-untyped-def]
                kill_server_of_hop(next(p.hop.endpoint for p in parts if (p.hop.start, p.hop.end) == (2, 4)))
                return original_sums(parts, factors)

            blocks.clip_sums = clip_sums  # type: ignore[method-assign]
        got = _step(model, start, batch, exchange)
        # the retry went to the replica: the killed server's blocks were served by the other one
        route = model.swarm.router.forward_route(2, 4)

    assert killed, "the test never killed a server"
    assert route[0].endpoint != killed[0]

    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
