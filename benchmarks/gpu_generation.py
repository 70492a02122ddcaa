"""GPU generation benchmark: the real SmolLM2 through `platform serve --device cuda` processes
against local `transformers` `generate()` on the same GPU, in one run.

Two server processes (blocks 0:15 and 15:30, float32, `--device cuda`) and a client whose
embeddings and head are on the GPU (`RemoteModelForCausalLM(device="cuda")`) generate
`--new-tokens` greedy tokens; the local baseline is `AutoModelForCausalLM(...).to("cuda")
.generate()` with the same prompt, token count and no sampling. Figures: ms per step (session
open and prefill apart), tokens/s, and whether the greedy tokens are identical.
Run by `benchmarks/gpu_check.sh`; results go to `benchmarks/results/gpu_check.json`.

    python benchmarks/gpu_generation.py               # 64 new tokens, 3 repeats
    python benchmarks/gpu_generation.py --quick       # 16 new tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _results import Run, machine_info, summary_ms, torch_stack
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.models.importer import cached_import
from corolla.platform.launch.servers import LocalServers

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
PROMPT = "The patient presented with a persistent cough and"
SPANS = [(0, 15), (15, 30)]


class _StepTimer:
    """A `transformers` streamer that stamps each token as it comes (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def steps_s(self) -> list[float]:
        """Seconds per decode step: the gaps after the first generated token (prefill excluded)."""
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:], strict=False)]


def bench_remote(model: Path, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, Any]:
    with (
        LocalServers(model, SPANS, extra_args=["--device", "cuda"]) as swarm,
        RemoteModelForCausalLM.from_pretrained(model, servers=swarm.endpoints, device="cuda") as remote,
    ):
        devices = [s.device for s in swarm.servers]
        remote.generate(ids, max_new_tokens=4, eos_token_id=None)  # warm-up: channels, kernels
        steps: list[float] = []
        out = ids
        for _ in range(repeats):
            timer = _StepTimer()
            out = remote.generate(ids, max_new_tokens=new_tokens, eos_token_id=None, streamer=timer)
            steps += timer.steps_s()
    return {"server_devices": devices, "step_ms": summary_ms(steps), "tokens": out[0].tolist()}


def bench_local(model: Path, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, Any]:
    local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to("cuda").eval()
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    local.generate(ids, **{**kwargs, "max_new_tokens": 4})  # warm-up
    steps: list[float] = []
    out = ids
    for _ in range(repeats):
        timer = _StepTimer()
        out = local.generate(ids, streamer=timer, **kwargs)
        steps += timer.steps_s()
    return {"device": torch.cuda.get_device_name(), "step_ms": summary_ms(steps), "tokens": out[0].tolist()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="16 new tokens, one repeat")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_generation: skipped: torch sees no CUDA device on this machine", flush=True)
        return 0
    new_tokens, repeats = (16, 1) if args.quick else (64, 3)
    model = cached_import()
    ids = AutoTokenizer.from_pretrained(model)(PROMPT, return_tensors="pt").input_ids.to("cuda")
    run = Run("gpu_check", quick=args.quick, machine=machine_info(**torch_stack(), gpu=torch.cuda.get_device_name()))
    result = run.result
    result["setup"] = {"model": str(model), "spans": SPANS, "new_tokens": new_tokens, "repeats": repeats}
    remote = bench_remote(model, ids, new_tokens, repeats)
    local = bench_local(model, ids, new_tokens, repeats)
    result["remote"], result["local_transformers"] = remote, local
    same = remote["tokens"] == local["tokens"]
    ratio = remote["step_ms"]["p50"] / local["step_ms"]["p50"]
    result["headline"] = {
        "remote_step_ms_p50": remote["step_ms"]["p50"],
        "local_step_ms_p50": local["step_ms"]["p50"],
        "remote_over_local": round(ratio, 2),
        "remote_tokens_per_s": round(1000 / remote["step_ms"]["p50"], 1),
        "greedy_tokens_identical": same,
    }
    run.finish(args.out)
    print(
        f"SmolLM2 on {local['device']}: swarm {remote['step_ms']['p50']:.2f} ms/step (2 cuda servers, cuda client) "
        f"vs local transformers {local['step_ms']['p50']:.2f} ms/step ({ratio:.2f}x); greedy tokens identical: {same}"
    )
    run.print_written()
    return 0


if __name__ == "__main__":
    sys.exit(main())
