"""Training benchmark: DP-LoRA steps through the swarm against local training, in one process run.

One optimizer step of a LoRA adapter (r = 8, Adam) on a batch of 8 random sequences of
128 tokens, the loss on the last 16 positions (a "completion"), four ways on the same
checkpoint, the same starting adapter and the same batches:

(a) `local_peft`: Hugging Face + PEFT in this process, no DP (`LocalTrainer`, noise None);
(b) `local_opacus_dp`: the same with Opacus's `PrivacyEngine` (noise 1.0, clip 1.0);
(c) `swarm_dp_per_sample`: `RemoteTrainer` through a 2-server loopback swarm, every server
    returning each record's adapter gradient (`exchange="per-sample"`);
(d) `swarm_dp_flat`: the same with flat clipping: servers return per-record squared norms,
    then the clipped sum (`exchange="flat"`).

For a tiny Llama (hidden 64, 4 blocks) and a mid-size one (hidden 1024, 8 blocks), with
LoRA on q_proj and v_proj (PEFT's default for Llama), and the mid-size one again with all
7 linear modules. Per variant: p50 / p90 / mean ms per step; ratios (c)/(b) and (d)/(b);
payload bytes per step by kind for (c) and (d) (`RemoteTrainer.bytes`), next to the
adapter size each server holds, and the TCP bytes `ss` saw on the client's connections.

Results go to `benchmarks/results/training.json`; a summary is printed.

    python benchmarks/training.py            # full run, 5 to 8 minutes on 2 cores
    python benchmarks/training.py --quick    # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
# Opacus ships a top-level `benchmarks` package that shadows this directory: import the
# sibling modules by path, as wan.py does.
sys.path[:0] = [str(HERE)]

import inference as inference_bench  # noqa: E402  (benchmarks/inference.py)
import opacus  # noqa: E402
import peft  # noqa: E402
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

from corolla.inference.client import LoraAdapter, LoraSettings, RemoteModelForCausalLM  # noqa: E402
from corolla.inference.models.checkpoint import Checkpoint  # noqa: E402
from corolla.inference.models.tiny import TinySpec, init_tiny  # noqa: E402
from corolla.platform.launch.servers import LocalServers  # noqa: E402
from corolla.training.data import EncodedBatch  # noqa: E402
from corolla.training.local_trainer import LocalTrainer  # noqa: E402
from corolla.training.remote_trainer import RemoteTrainer  # noqa: E402

RESULTS = HERE / "results" / "training.json"

TARGET_DP_RATIO = 2.0  # swarm DP step within 2x of local Opacus DP, mid-size config
Q_V = ("q_proj", "v_proj")  # PEFT's default LoRA targets for Llama
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Variant = Literal["local_peft", "local_opacus_dp", "swarm_dp_per_sample", "swarm_dp_flat"]
VARIANTS: dict[Variant, str] = {
    "local_peft": "LocalTrainer, noise None: HF + PEFT LoRA in this process, plain (non-private) training",
    "local_opacus_dp": "LocalTrainer, noise 1.0: HF + PEFT + Opacus PrivacyEngine (GradSampleModule + "
    "DPOptimizer) in this process",
    "swarm_dp_per_sample": "RemoteTrainer(exchange='per-sample'), noise 1.0: servers return (B, *shape) "
    "per-sample adapter gradients; Opacus DPOptimizer clips, noises and steps",
    "swarm_dp_flat": "RemoteTrainer(exchange='flat'), noise 1.0: servers return B squared norms, the client "
    "sends B clip factors, servers return the clipped sum (adapter-sized)",
}


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainBench:
    name: str  # key in the JSON
    spec: TinySpec
    spans: tuple[tuple[int, int], ...]  # one server per span
    targets: tuple[str, ...]  # LoRA target modules
    rank: int  # LoRA r (alpha = 2r, as PEFT's examples)
    batch: int  # records per step
    tokens: int  # tokens per record
    completion_tokens: int  # positions scored by the loss, at the end of each record
    warmup: int  # untimed steps per variant (first touch of weights, connections, allocator)
    repeats: int  # timed steps per variant, interleaved across variants
    server_threads: int  # torch threads of each server process (OMP_NUM_THREADS)
    local_threads: int  # torch threads of this process: the swarm client and the local baselines

    def __post_init__(self) -> None:
        for name in ("rank", "batch", "tokens", "completion_tokens", "repeats", "server_threads", "local_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.completion_tokens >= self.tokens:
            raise ValueError(f"completion_tokens={self.completion_tokens} must be below tokens={self.tokens}")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must not be negative")


@dataclass(frozen=True, kw_only=True, slots=True)
class DpSettings:
    noise_multiplier: float  # for (b), (c), (d)
    max_grad_norm: float  # per-record clip norm C
    lr: float  # Adam


DP = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, lr=1e-3)

TINY = TinySpec(arch="llama")  # hidden 64, 4 blocks, 4 heads / 2 KV heads, MLP 128, vocab 512
MID = inference_bench.MID  # hidden 1024, 8 blocks, 16 heads / 8 KV heads, MLP 2816, vocab 512
SMALL = inference_bench.SMALL  # quick run's stand-in for MID: hidden 256, 4 blocks

# One thread per process by default: the servers never compute at the same time and the
# client idles while they do, but on a machine that other jobs share, two OpenMP threads
# per process spin at every barrier whenever one of them is descheduled, which made local
# steps 3-10x slower and erratic in trials (`--threads 2` on an idle machine).
_MID_QV = TrainBench(
    name="mid",
    spec=MID,
    spans=((0, 4), (4, 8)),
    targets=Q_V,
    rank=8,
    batch=8,
    tokens=128,
    completion_tokens=16,
    warmup=1,
    repeats=7,
    server_threads=1,
    local_threads=1,
)
FULL: tuple[TrainBench, ...] = (
    replace(_MID_QV, name="tiny", spec=TINY, spans=((0, 2), (2, 4)), warmup=2, repeats=15),
    _MID_QV,
    replace(_MID_QV, name="mid_all_linear", targets=ALL_LINEAR, repeats=3),
)
# Smoke run: the same code paths on smaller work; "mid" is a smaller model and batch, so its
# ratio is not the figure the target is about.
QUICK: tuple[TrainBench, ...] = (
    replace(_MID_QV, name="tiny", spec=TINY, spans=((0, 2), (2, 4)), batch=4, tokens=64, repeats=3),
    replace(_MID_QV, spec=SMALL, spans=((0, 2), (2, 4)), batch=4, tokens=64, repeats=2),
)


# -- one configuration --------------------------------------------------------------------------


def make_batches(cfg: TrainBench, vocab: int, count: int) -> list[EncodedBatch]:
    """Random token ids; the loss on the last `completion_tokens` positions (the logits at
    position t score token t + 1, so the mask ends one before the last token)."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(cfg.batch, cfg.tokens, dtype=torch.bool)
    mask[:, cfg.tokens - 1 - cfg.completion_tokens : cfg.tokens - 1] = True
    return [
        EncodedBatch(
            input_ids=torch.randint(0, vocab, (cfg.batch, cfg.tokens), generator=generator),
            loss_mask=mask,
            lengths=torch.full((cfg.batch,), cfg.tokens),
        )
        for _ in range(count)
    ]


def bench_config(cfg: TrainBench, model_dir: Path) -> dict[str, Any]:
    checkpoint = Checkpoint.open(model_dir)
    settings = LoraSettings(r=cfg.rank, alpha=2.0 * cfg.rank, targets=cfg.targets)
    start = LoraAdapter.init(checkpoint, settings, seed=0)
    span_bytes = [sum(t.nbytes for t in start.span(a, b).values()) for a, b in cfg.spans]
    steps = cfg.warmup + cfg.repeats
    # Every variant takes step k on batch k: the same records, in the same order.
    batches = make_batches(cfg, checkpoint.config.vocab_size, steps)

    def clone() -> LoraAdapter:
        return LoraAdapter(checkpoint, settings, start.state())

    times: dict[Variant, list[float]] = {name: [] for name in VARIANTS}
    first_loss: dict[Variant, float] = {}
    tcp: dict[Variant, list[int]] = {}
    cpu: dict[Variant, list[tuple[float, float]]] = {name: [] for name in VARIANTS}  # (this process, servers)
    ports: dict[Variant, list[int]] = {}
    trainers: dict[Variant, Any] = {}
    with torch_threads(cfg.local_threads), contextlib.ExitStack() as stack:
        started = time.perf_counter()
        swarm = stack.enter_context(LocalServers(model_dir, cfg.spans, torch_threads=cfg.server_threads))
        swarm_start_s = time.perf_counter() - started
        server_threads_seen = [inference_bench.env_threads(s.process.pid) for s in swarm.servers]
        server_pids = [s.process.pid for s in swarm.servers]
        local_kw: dict[str, Any] = dict(lr=DP.lr, max_grad_norm=DP.max_grad_norm, expected_batch_size=cfg.batch)
        trainers["local_peft"] = LocalTrainer(model_dir, clone(), noise_multiplier=None, **local_kw)
        trainers["local_opacus_dp"] = LocalTrainer(
            model_dir,
            clone(),
            noise_multiplier=DP.noise_multiplier,
            generator=torch.Generator().manual_seed(1),
            **local_kw,
        )
        for name, exchange in (("swarm_dp_per_sample", "per-sample"), ("swarm_dp_flat", "flat")):
            # One client each: `use_adapter` binds one adapter per client. By endpoint, so this
            # process (where the local baselines run) has no libp2p thread.
            model = stack.enter_context(RemoteModelForCausalLM.from_pretrained(model_dir, servers=swarm.endpoints))
            trainers[name] = RemoteTrainer(
                model,
                clone(),
                exchange=exchange,
                noise_multiplier=DP.noise_multiplier,
                generator=torch.Generator().manual_seed(1),
                **local_kw,
            )
            ports[name] = [int(e.rsplit(":", 1)[1]) for e in swarm.endpoints]
            tcp[name] = []
        names = list(VARIANTS)
        for name in names:
            for k in range(cfg.warmup):
                loss = trainers[name].step(batches[k])
                first_loss.setdefault(name, loss)
        # Interleaved, the order rotated each round, so that drifting background load on a
        # shared machine hits every variant alike.
        for rep in range(cfg.repeats):
            batch = batches[cfg.warmup + rep]
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                before = inference_bench.tcp_bytes(ports[name]) if name in ports else None
                c0, s0 = time.process_time(), process_cpu_seconds(server_pids)
                t0 = time.perf_counter()
                loss = trainers[name].step(batch)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append((time.process_time() - c0, process_cpu_seconds(server_pids) - s0))
                first_loss.setdefault(name, loss)
                if before is not None:
                    after = inference_bench.tcp_bytes(ports[name])
                    if after is not None:
                        tcp[name].append(after - before)
        payload = {name: dict(trainers[name].bytes) for name in ("swarm_dp_per_sample", "swarm_dp_flat")}

    rows: dict[str, Any] = {}
    local_dp_p50 = summary_ms(times["local_opacus_dp"])["p50"]
    for name in names:
        row: dict[str, Any] = {
            "how": VARIANTS[name],
            "step_ms": summary_ms(times[name]),
            "step_ms_all": [round(s * 1000, 1) for s in times[name]],
            # CPU time per step (mean): less sensitive than wall time to other load on the machine
            "cpu_ms_per_step": {
                "this_process": round(statistics.fmean(c for c, _ in cpu[name]) * 1000, 1),
                "servers": round(statistics.fmean(s for _, s in cpu[name]) * 1000, 1),
            },
            "first_step_loss": round(first_loss[name], 6),
        }
        if name != "local_opacus_dp":
            row["ratio_p50_vs_local_opacus_dp"] = round(row["step_ms"]["p50"] / local_dp_p50, 3)
            # each round's variant / Opacus, then the median: drifting background load cancels
            row["ratio_paired_median_vs_local_opacus_dp"] = round(
                statistics.median(a / b for a, b in zip(times[name], times["local_opacus_dp"], strict=True)), 3
            )
        if name in payload:
            row["bytes_per_step"] = _per_step(payload[name], steps)
            row["tcp_bytes_per_step_measured"] = (
                {"mean": round(statistics.fmean(tcp[name])), "min": min(tcp[name]), "max": max(tcp[name])}
                if tcp[name]
                else None
            )
        rows[name] = row
    return {
        "config": {
            "model": {**asdict(cfg.spec), "params": _params(model_dir)},
            "servers": [f"{a}:{b}" for a, b in cfg.spans],
            "lora": {
                "r": cfg.rank,
                "alpha": 2.0 * cfg.rank,
                "targets": list(settings.targets),
                "adapter_bytes": start.nbytes(),
                "adapter_params": start.nbytes() // 4,
            },
            "batch": cfg.batch,
            "tokens": cfg.tokens,
            "loss_positions_per_record": cfg.completion_tokens,
            "input": "random token ids, seeded; every variant sees the same batch at step k",
            "dp": {**asdict(DP), "optimizer": "adam", "note": "local_peft: same lr, no clipping, no noise"},
            "warmup_steps": cfg.warmup,
            "timed_steps": cfg.repeats,
            "torch_threads": {
                "each_server": cfg.server_threads,
                "client_and_local": cfg.local_threads,
                "servers_OMP_NUM_THREADS_seen": server_threads_seen,
            },
            "statistic": "wall time of trainer.step(batch); variants interleaved, order rotated each round",
        },
        **rows,
        "ratios": {
            "swarm_dp_per_sample_over_local_opacus_dp_p50": rows["swarm_dp_per_sample"]["ratio_p50_vs_local_opacus_dp"],
            "swarm_dp_flat_over_local_opacus_dp_p50": rows["swarm_dp_flat"]["ratio_p50_vs_local_opacus_dp"],
            "local_opacus_dp_over_local_peft_p50": round(local_dp_p50 / rows["local_peft"]["step_ms"]["p50"], 3),
            "swarm_dp_flat_over_local_peft_p50": round(
                rows["swarm_dp_flat"]["step_ms"]["p50"] / rows["local_peft"]["step_ms"]["p50"], 3
            ),
        },
        # all four start from the same adapter on the same batch: the same loss, or not the same work
        "first_step_losses_agree": max(first_loss.values()) - min(first_loss.values()) < 1e-4,
        "exchange": exchange_figures(cfg, span_bytes, rows),
        "swarm_start_s": round(swarm_start_s, 2),
    }


def _per_step(counter: dict[str, int], steps: int) -> dict[str, float]:
    out = {kind: round(total / steps, 1) for kind, total in sorted(counter.items())}
    out["total"] = round(sum(counter.values()) / steps, 1)
    return out


def exchange_figures(cfg: TrainBench, span_bytes: list[int], rows: dict[str, Any]) -> dict[str, Any]:
    """What the adapter costs on the wire per server per step, in each direction, against the
    adapter weights that server holds. The counters do not split by server: the per-server
    figures are the protocol's (below), checked against the counters' totals."""
    b = cfg.batch
    scalars = 4 * b  # B float32: squared norms back, or clip factors out
    servers = len(span_bytes)
    per_server = []
    for (start, end), nbytes in zip(cfg.spans, span_bytes, strict=True):
        per_server.append(
            {
                "blocks": f"{start}:{end}",
                "adapter_bytes": nbytes,
                "flat": {
                    "client_to_server": {"adapter_put": nbytes, "clip_factors": scalars, "total": nbytes + scalars},
                    "server_to_client": {"squared_norms": scalars, "clipped_sum": nbytes, "total": nbytes + scalars},
                    "gradient_exchange_both_ways": nbytes + 2 * scalars,  # what flat clipping adds
                    "gradient_exchange_over_adapter": round((nbytes + 2 * scalars) / nbytes, 6),
                },
                "per_sample": {
                    "client_to_server": {"adapter_put": nbytes, "total": nbytes},
                    "server_to_client": {"per_sample_grads": b * nbytes, "total": b * nbytes},
                    "gradient_exchange_over_adapter": b,
                },
            }
        )
    flat, per_sample = rows["swarm_dp_flat"]["bytes_per_step"], rows["swarm_dp_per_sample"]["bytes_per_step"]
    expected = {
        "flat": {
            "adapter_put": sum(span_bytes),
            "adapter_grads": sum(span_bytes) + servers * scalars,
            "clip_factors": servers * scalars,
        },
        "per_sample": {"adapter_put": sum(span_bytes), "adapter_grads": b * sum(span_bytes)},
    }
    hidden = cfg.batch * cfg.tokens * cfg.spec.hidden_size * 4
    return {
        "per_server": per_server,
        "activations_per_step": {
            "bytes": flat.get("activations"),
            "hidden_state_bytes": hidden,
            "note": "float32 (B, T, H) per message: forward in+out per hop, backward hidden+grad_output per hop, "
            "input gradient back from every hop but the first",
        },
        "counters_match_protocol": {
            "flat": all(abs(flat.get(k, 0) - v) < 1 for k, v in expected["flat"].items()),
            "per_sample": all(abs(per_sample.get(k, 0) - v) < 1 for k, v in expected["per_sample"].items()),
            "expected_per_step": expected,
        },
    }


def _params(model_dir: Path) -> int:
    """Parameter count from the safetensors headers (no need to load the model again)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += math.prod(f.get_slice(key).get_shape())
    return total


# -- report -------------------------------------------------------------------------------------


def targets(results: dict[str, Any], *, quick: bool) -> dict[str, Any]:
    mid = results["mid"]
    note = "quick run uses a smaller model and batch: not the target's shape" if quick else None
    out: dict[str, Any] = {}
    for name in ("swarm_dp_flat", "swarm_dp_per_sample"):
        ratio = mid[name]["ratio_p50_vs_local_opacus_dp"]
        out[f"mid_{name}_over_local_opacus_dp"] = {
            "value": ratio,
            "limit": TARGET_DP_RATIO,
            "pass": ratio <= TARGET_DP_RATIO,
            "note": note or "p50 step / p50 local Opacus DP step, mid-size config (hidden 1024, 8 blocks, 8 x 128)",
        }
    for key in ("mid",) + (("mid_all_linear",) if "mid_all_linear" in results else ()):
        for server in results[key]["exchange"]["per_server"]:
            flat, adapter = server["flat"], server["adapter_bytes"]
            exchange = flat["gradient_exchange_both_ways"]
            clipped_sum = flat["server_to_client"]["clipped_sum"]
            out[f"{key}_flat_gradient_payload_blocks_{server['blocks']}"] = {
                "value": clipped_sum,
                "limit": adapter,
                "pass": clipped_sum <= adapter,
                "note": "the adapter-sized part of the flat exchange with this server: the clipped sum; the B "
                "squared norms and B clip factors (4 bytes each per record) are counted in the strict check below",
            }
            out[f"{key}_flat_gradient_exchange_blocks_{server['blocks']}"] = {
                "value": exchange,
                "limit": adapter,
                "pass": exchange <= adapter,
                "excess_bytes": exchange - adapter,
                "note": "bytes per step of the flat exchange with this server on top of activations: the "
                "clipped sum (adapter-sized) + B squared norms back + B clip factors out; the limit "
                "is the adapter weights this server holds. Not counted here: the weights the client "
                "puts every step (another adapter size, client to server).",
            }
    return out


def print_summary(result: dict[str, Any]) -> None:
    m = result["machine"]
    other = m["cpu_during_run"]["other_cpu_share"]
    print(
        f"\nCorolla training benchmark ({result['mode']}), {m['cores']} cores, torch {m['torch']}, "
        f"load {m['loadavg_at_start']} -> {m['loadavg_at_end']}, other processes took "
        f"{other if other is None else f'{other:.0%}'} of the CPU meanwhile"
    )
    for key, res in result["configs"].items():
        c = res["config"]
        print(
            f"{key}: hidden {c['model']['hidden_size']}, {c['model']['num_layers']} blocks on "
            f"{len(c['servers'])} servers, batch {c['batch']} x {c['tokens']}, LoRA r={c['lora']['r']} on "
            f"{','.join(c['lora']['targets'])} ({c['lora']['adapter_bytes'] / 2**10:.0f} KiB), "
            f"threads {c['torch_threads']['each_server']}/server {c['torch_threads']['client_and_local']} local, "
            f"{c['timed_steps']} timed steps"
        )
        print(
            f"    {'':22} {'p50 ms':>9} {'p90 ms':>9} {'mean ms':>9}  {'/opacus':>7}  {'cpu ms here+servers':>19}"
            "  payload/step"
        )
        for name in VARIANTS:
            r = res[name]
            s = r["step_ms"]
            ratio = r.get("ratio_p50_vs_local_opacus_dp", 1.0)
            extra = ""
            if "bytes_per_step" in r:
                b = r["bytes_per_step"]
                extra = (
                    f"act {b.get('activations', 0) / 2**20:.1f} MiB, grads {b.get('adapter_grads', 0) / 2**10:.0f}"
                    f" KiB, put {b.get('adapter_put', 0) / 2**10:.0f} KiB"
                )
            cpu_ms = r["cpu_ms_per_step"]
            cpu = f"{cpu_ms['this_process']:.0f}+{cpu_ms['servers']:.0f}"
            print(f"    {name:22} {s['p50']:9.1f} {s['p90']:9.1f} {s['mean']:9.1f}  x{ratio:6.3f}  {cpu:>19}  {extra}")
        for server in res["exchange"]["per_server"]:
            f = server["flat"]
            print(
                f"    flat, server {server['blocks']}: adapter {server['adapter_bytes']} B; to server "
                f"{f['client_to_server']['total']} B (put {f['client_to_server']['adapter_put']} + factors "
                f"{f['client_to_server']['clip_factors']}), back {f['server_to_client']['total']} B (sum "
                f"{f['server_to_client']['clipped_sum']} + norms {f['server_to_client']['squared_norms']})"
            )
    for name, t in result["targets"].items():
        print(
            f"target {name}: {t['value']} vs limit {t['limit']}: {'PASS' if t['pass'] else 'FAIL'}"
            + (f" (excess {t['excess_bytes']} B)" if "excess_bytes" in t else "")
        )
    warn_if_loaded(m, ". Re-run on an idle machine before quoting figures.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run (under a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--threads", type=int, help="torch threads of every server and of this process (default 1)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.threads is not None:
        plan = tuple(replace(cfg, server_threads=args.threads, local_threads=args.threads) for cfg in plan)
    run = Run(
        "training",
        quick=args.quick,
        machine={**machine_info(**torch_stack()), "opacus": opacus.__version__, "peft": peft.__version__},
    )
    result = run.result
    result["configs"] = {}
    with tempfile.TemporaryDirectory(prefix="corolla-bench-") as tmp:
        model_dirs: dict[TinySpec, Path] = {}
        for cfg in plan:
            if cfg.spec not in model_dirs:
                model_dirs[cfg.spec] = init_tiny(Path(tmp) / f"model-{len(model_dirs)}", cfg.spec)
            result["configs"][cfg.name] = bench_config(cfg, model_dirs[cfg.spec])
    result["targets"] = targets(result["configs"], quick=args.quick)
    run.finish(args.out)
    print_summary(result)
    run.print_written()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
