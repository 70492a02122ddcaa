"""WAN benchmark: generation across namespaced hosts with added latency, and the cost of mutual TLS.

(a) Greedy decode steps per second through a 3-hop chain (blocks 0:2, 2:3, 3:4 of the
    tiny Llama, one `platform serve` per hop), every process in its own network
    namespace and every server's gRPC port behind a delaying TCP proxy
    (`tests/e2e/netns.py`), with 0, 20, 50 and 100 ms of added round-trip time. The
    baseline is the bound the network alone sets: one step crosses every hop once, so
    it takes at least hops x RTT, i.e. at most 1 / (hops x RTT) steps per second; the
    ratio achieved / bound says how much of it the stack keeps. Mutual TLS, as deployed.
(b) The 2-server generation benchmark of `inference.py` (tiny Llama, blocks 0:2 and
    2:4, loopback): per-step latency with mutual TLS against plaintext (`--insecure`),
    the two swarms up side by side and their generations interleaved, so that drifting
    background load hits both alike.

Results go to `benchmarks/results/wan.json`; a summary is printed. (a) needs root and
`ip netns`; without them it is skipped with the reason in the JSON, and (b) still runs.

    python benchmarks/wan.py            # full run, about 3 minutes
    python benchmarks/wan.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The namespace lab lives with the e2e tests; the generation loop with the inference benchmark.
sys.path[:0] = [str(ROOT), str(HERE)]

import inference as inference_bench  # noqa: E402  (benchmarks/inference.py)
import torch  # noqa: E402
from _results import Run, machine_info, summary_ms, torch_stack, torch_threads, warn_if_loaded  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from corolla.inference.client import RemoteModelForCausalLM  # noqa: E402
from corolla.inference.models.tiny import TinySpec, init_tiny  # noqa: E402
from corolla.inference.security import TlsConfig  # noqa: E402
from corolla.pki import NodeIdentity  # noqa: E402
from corolla.platform.launch.servers import LocalServers  # noqa: E402
from corolla.platform.workspace import throwaway_consortium  # noqa: E402
from tests.e2e.netns import DelayProxy, NetnsLab, namespaces_available, wait_for_line  # noqa: E402
from tests.e2e.swarm_lab import NamespaceSwarm  # noqa: E402

RESULTS = HERE / "results" / "wan.json"
LAB_PREFIX = "corw"  # namespaces "corw-<pid>-..."; `python tests/e2e/netns.py cleanup --prefix corw` after a kill
LAB_SUBNET = "10.77.2.0/24"


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class WanBench:
    spec: TinySpec
    spans: tuple[tuple[int, int], ...]  # one server (and one hop) per span
    rtts_ms: tuple[float, ...]  # added round-trip time per hop, one level after another
    prompt_tokens: int  # prefilled in one step before the timed steps
    warmup_steps: int  # untimed steps at each level, in the same session
    steps: int  # timed steps at each level
    echo_rounds: int  # ping-pongs of the echo calibration at each level

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "steps", "echo_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.warmup_steps < 0 or any(rtt < 0 for rtt in self.rtts_ms):
            raise ValueError(f"warmup_steps={self.warmup_steps} and rtts_ms={self.rtts_ms} must not be negative")


@dataclass(frozen=True, kw_only=True, slots=True)
class TlsBench:
    spec: TinySpec
    spans: tuple[tuple[int, int], ...]
    prompt_tokens: int
    new_tokens: int  # greedy tokens per generation: 1 from the prefill + (new_tokens - 1) timed steps
    warmup: int  # untimed generations per variant
    repeats: int  # timed generations per variant, interleaved
    threads: int  # torch threads of each server and of the client

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens={self.new_tokens} must be at least 2 (one prefill, one step)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    wan: WanBench
    tls: TlsBench


FULL = Plan(
    wan=WanBench(
        spec=inference_bench.TINY,
        spans=((0, 2), (2, 3), (3, 4)),
        rtts_ms=(0, 20, 50, 100),
        prompt_tokens=16,
        warmup_steps=5,
        steps=40,
        echo_rounds=30,
    ),
    tls=TlsBench(
        spec=inference_bench.TINY,
        spans=((0, 2), (2, 4)),
        prompt_tokens=16,
        new_tokens=64,
        warmup=2,
        repeats=8,
        threads=1,
    ),
)
QUICK = Plan(
    wan=WanBench(
        spec=inference_bench.TINY,
        spans=((0, 2), (2, 3), (3, 4)),
        rtts_ms=(50,),
        prompt_tokens=16,
        warmup_steps=2,
        steps=10,
        echo_rounds=10,
    ),
    tls=TlsBench(
        spec=inference_bench.TINY,
        spans=((0, 2), (2, 4)),
        prompt_tokens=16,
        new_tokens=16,
        warmup=1,
        repeats=2,
        threads=1,
    ),
)


# -- (a) steps per second against the network bound ---------------------------------------------


def bench_wan(cfg: WanBench, workdir: Path) -> dict[str, Any]:
    available, reason = namespaces_available()
    if not available:
        return {"skipped": reason}
    model_dir = init_tiny(workdir / "wan-model", cfg.spec)
    consortium = throwaway_consortium(workdir / "wan-ws", servers=len(cfg.spans) + 1, sites=1)
    hops = len(cfg.spans)
    levels: list[dict[str, Any]] = []
    started = time.perf_counter()
    with (
        NetnsLab(prefix=LAB_PREFIX, subnet=LAB_SUBNET) as lab,
        NamespaceSwarm(lab, model_dir, cfg.spans, rtt_ms=cfg.rtts_ms[0], consortium=consortium) as swarm,
    ):
        swarm_start_s = time.perf_counter() - started
        echo_host = swarm.servers[0].host
        echo = echo_host.run(_harness("serve"), cwd=ROOT, stdout=subprocess.PIPE, text=True)
        echo_port = int(wait_for_line(echo, "READY", timeout=30).split("port=")[1])
        for index, rtt in enumerate(cfg.rtts_ms):
            client = swarm.run_client(
                "decode",
                "--prompt-tokens",
                str(cfg.prompt_tokens),
                "--warmup-steps",
                str(cfg.warmup_steps),
                "--steps",
                str(cfg.steps),
            )
            # The proxies are restarted with the next level's delay; what they carried was this level's.
            following = cfg.rtts_ms[index + 1] if index + 1 < len(cfg.rtts_ms) else rtt
            stats = swarm.set_rtt(following)
            level = _wan_level(client.data, rtt, hops, stats, client.wall_s)
            level["echo_calibration"] = _echo_calibration(swarm.client_host, echo_host, echo_port, rtt, cfg.echo_rounds)
            levels.append(level)
    reference = _reference_tokens(model_dir, levels[0]["prompt"], 1 + cfg.warmup_steps + cfg.steps)
    zero = next((level for level in levels if level["rtt_ms"] == 0), None)
    for level in levels:
        level["tokens_match_local"] = level.pop("tokens") == reference
        del level["prompt"]
        if zero is not None and level is not zero:
            # what latency costs beyond the round trips themselves: step time minus (the
            # 0 ms step, i.e. compute and the stack, plus hops x RTT)
            level["excess_ms_over_zero_rtt_step_plus_bound"] = {
                q: round(level["per_step_ms"][q] - zero["per_step_ms"][q] - level["network_bound_ms_per_step"], 3)
                for q in ("p50", "mean")
            }
            # ... per hop, less what a bare echo pays for the same delay (proxy timers, idle wake-ups)
            echo_extra = (
                level["echo_calibration"]["excess_ms_over_rtt"] - zero["echo_calibration"]["excess_ms_over_rtt"]
            )
            level["excess_ms_per_hop_beyond_echo"] = round(
                level["excess_ms_over_zero_rtt_step_plus_bound"]["mean"] / hops - echo_extra, 3
            )
    return {
        "config": {
            "model": asdict(cfg.spec),
            "servers": [f"{a}:{b}" for a, b in cfg.spans],
            "hops": hops,
            "hosts": "bootstrap peer, each server and the client in its own network namespace, veths on one bridge",
            "latency": "a delaying TCP proxy (tests/e2e/netns.py DelayProxy) in each server's namespace in front of "
            "its gRPC port, RTT/2 each way; servers announce the proxy's port; DHT traffic not delayed",
            "security": "mutual TLS, certificate-checked DHT records, private DHT (throwaway consortium)",
            "rtts_ms": list(cfg.rtts_ms),
            "prompt_tokens": cfg.prompt_tokens,
            "warmup_steps": cfg.warmup_steps,
            "timed_steps": cfg.steps,
            "torch_threads": {"each_server": 1, "client": 1},
            "per_step_definition": "client loop per token: embed + session.step (every hop, sequentially) + "
            "head + argmax; the same session for every step of a level",
            "bound": "network alone: hops x RTT per step, i.e. 1000 / (hops x RTT) steps/s",
            "client": "a new client process per level (joins the DHT, opens one session)",
            "derived": {
                "overhead_ms_per_step_over_bound": "step - hops x RTT",
                "excess_ms_over_zero_rtt_step_plus_bound": "step - (the 0 ms level's step + hops x RTT): what the "
                "delay costs beyond the round trips themselves",
                "echo_calibration": "64-byte TCP ping-pong, client host -> an asyncio echo on server 0's host through "
                "a proxy with the same delay: the emulation's own excess (proxy timers, idle wake-ups)",
                "excess_ms_per_hop_beyond_echo": "excess / hops - (echo excess at this RTT - echo excess at 0 ms)",
            },
        },
        "swarm_start_s": round(swarm_start_s, 1),
        "levels": levels,
    }


def _wan_level(data: dict[str, Any], rtt: float, hops: int, stats: list[Any], wall_s: float) -> dict[str, Any]:
    step = summary_ms(data["step_s"])
    bound_ms = hops * rtt
    row: dict[str, Any] = {
        "rtt_ms": rtt,
        "per_step_ms": step,
        "steps_per_s": round(1000 / step["mean"], 2),
        "steps_per_s_at_p50": round(1000 / step["p50"], 2),
        "network_bound_ms_per_step": bound_ms,
        "network_bound_steps_per_s": round(1000 / bound_ms, 3) if bound_ms else None,
        # achieved / bound, in steps per second: bound time / achieved time
        "ratio_to_bound": round(bound_ms / step["mean"], 4) if bound_ms else None,
        "ratio_to_bound_at_p50": round(bound_ms / step["p50"], 4) if bound_ms else None,
        "overhead_ms_per_step_over_bound": {
            "mean": round(step["mean"] - bound_ms, 3),
            "p50": round(step["p50"] - bound_ms, 3),
        },
        "session_open_ms": round(data["open_s"] * 1000, 1),
        "prefill_ms": round(data["prefill_s"] * 1000, 1),
        "route": [f"{h['endpoint']} {h['start']}:{h['end']}" for h in data["route"]],
        "client_rtt_estimate_ms": {k: round(v, 1) for k, v in data.get("rtt_ms_measured", {}).items()},
        "proxies": stats,
        "client_process_wall_s": round(wall_s, 1),
        "prompt": data["prompt"],
        "tokens": data["tokens"],
    }
    return row


def _harness(*args: str) -> list[str]:
    """The TCP echo peers of the namespace harness tests, run as a script."""
    return [sys.executable, "-m", "tests.e2e.test_netns_harness", *args]


def _echo_calibration(client: Any, server: Any, echo_port: int, rtt: float, rounds: int) -> dict[str, Any]:
    """What the emulation alone costs: 64-byte ping-pong from the client's host to an
    asyncio echo on a server's host, through a proxy like the servers' with the same delay."""
    with DelayProxy(server, listen=(server.ip, 0), target=("127.0.0.1", echo_port), rtt_ms=rtt) as proxy:
        if proxy.address is None:
            raise RuntimeError("the echo proxy did not report its address")
        out = client.check_output(_harness("pingpong", str(rounds), f"{server.ip}:{proxy.address[1]}"), cwd=ROOT)
    median = json.loads(out)[0]
    return {
        "round_trip_ms_median": round(median, 3),
        "excess_ms_over_rtt": round(median - rtt, 3),
        "rounds": rounds,
        "proxy": proxy.stats,
    }


def _reference_tokens(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    with torch_threads(1), torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=None)
    return [int(t) for t in out[0, len(prompt) :]]


# -- (b) mutual TLS against plaintext on loopback -----------------------------------------------


def bench_tls(cfg: TlsBench, workdir: Path) -> dict[str, Any]:
    model_dir = init_tiny(workdir / "tls-model", cfg.spec)
    consortium = throwaway_consortium(workdir / "tls-ws", servers=len(cfg.spans), sites=1)
    site = TlsConfig.for_node(NodeIdentity.load(consortium.workspace / "nodes" / consortium.sites[0]))
    prompt = torch.randint(
        0, cfg.spec.vocab_size - 16, (1, cfg.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    with torch_threads(cfg.threads), torch.inference_mode():
        local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        reference = local.generate(
            prompt, max_new_tokens=cfg.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=None
        )
        started = time.perf_counter()
        with (
            LocalServers(
                model_dir,
                cfg.spans,
                torch_threads=cfg.threads,
                workspace=consortium.workspace,
                nodes=consortium.servers,
            ) as secure_swarm,
            LocalServers(model_dir, cfg.spans, torch_threads=cfg.threads) as plain_swarm,
        ):
            swarm_start_s = time.perf_counter() - started
            joined: dict[str, float] = {}
            t0 = time.perf_counter()
            with RemoteModelForCausalLM.from_pretrained(
                model_dir, initial_peers=secure_swarm.initial_peers, tls=site
            ) as secure:
                secure.swarm.router.records(refresh=True)
                joined["mutual_tls"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                with RemoteModelForCausalLM.from_pretrained(
                    model_dir, initial_peers=plain_swarm.initial_peers
                ) as plain:
                    plain.swarm.router.records(refresh=True)
                    joined["plaintext"] = time.perf_counter() - t0
                    runs = inference_bench.interleaved(
                        {
                            "mutual_tls": lambda: inference_bench.remote_generation(secure, prompt, cfg.new_tokens),
                            "plaintext": lambda: inference_bench.remote_generation(plain, prompt, cfg.new_tokens),
                        },
                        warmup=cfg.warmup,
                        repeats=cfg.repeats,
                    )
    rows = {
        name: {
            **inference_bench.generation_figures(variant_runs, cfg.new_tokens),
            "client_join_and_first_lookup_s": round(joined[name], 3),
            "tokens_match_local": all(bool(torch.equal(r.tokens, reference)) for r in variant_runs),
        }
        for name, variant_runs in runs.items()
    }
    tls_step, plain_step = rows["mutual_tls"]["per_step_ms"], rows["plaintext"]["per_step_ms"]
    paired = [
        statistics.fmean(a.steps_s) / statistics.fmean(b.steps_s)
        for a, b in zip(runs["mutual_tls"], runs["plaintext"], strict=True)
    ]
    return {
        "config": {
            "model": asdict(cfg.spec),
            "servers": [f"{a}:{b}" for a, b in cfg.spans],
            "prompt_tokens": cfg.prompt_tokens,
            "new_tokens": cfg.new_tokens,
            "timed_steps_per_generation": cfg.new_tokens - 1,
            "warmup_generations": cfg.warmup,
            "repeats": cfg.repeats,
            "torch_threads": {"each_server": cfg.threads, "client": cfg.threads},
            "variants": {
                "mutual_tls": "LocalServers(workspace=, nodes=): certificates, TLS gRPC, signed records, private DHT; "
                "the client with a site identity",
                "plaintext": "LocalServers() with --insecure: plaintext gRPC, open DHT",
            },
            "order": "both swarms up at once; generations alternate, the order rotated each round",
            "per_step_definition": "as in inference.py: embed + session.step (both hops) + head + argmax",
        },
        **rows,
        "swarm_start_s": round(swarm_start_s, 1),
        "ratios": {
            "tls_over_plaintext_step_p50": round(tls_step["p50"] / plain_step["p50"], 4),
            "tls_over_plaintext_step_mean": round(tls_step["mean"] / plain_step["mean"], 4),
            "tls_over_plaintext_paired_round_median": round(statistics.median(paired), 4),
            "tls_minus_plaintext_step_p50_ms": round(tls_step["p50"] - plain_step["p50"], 4),
        },
    }


# -- report -------------------------------------------------------------------------------------


def headline(wan: dict[str, Any], tls: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "levels" in wan:
        out["wan_hops"] = wan["config"]["hops"]
        for level in wan["levels"]:
            key = f"rtt_{level['rtt_ms']:g}ms"
            out[key] = {
                "steps_per_s": level["steps_per_s"],
                "bound_steps_per_s": level["network_bound_steps_per_s"],
                "ratio_to_bound": level["ratio_to_bound"],
                "overhead_ms_per_step_over_bound": level["overhead_ms_per_step_over_bound"]["mean"],
            }
            if "excess_ms_over_zero_rtt_step_plus_bound" in level:
                excess = level["excess_ms_over_zero_rtt_step_plus_bound"]["mean"]
                out[key]["excess_ms_over_zero_rtt_step_plus_bound"] = excess
                out[key]["excess_ms_per_hop_beyond_echo"] = level["excess_ms_per_hop_beyond_echo"]
        out["wan_tokens_match_local"] = all(level["tokens_match_local"] for level in wan["levels"])
    else:
        out["wan_skipped"] = wan["skipped"]
    out["tls_over_plaintext_step_p50"] = tls["ratios"]["tls_over_plaintext_step_p50"]
    out["tls_over_plaintext_step_mean"] = tls["ratios"]["tls_over_plaintext_step_mean"]
    out["tls_step_p50_ms"] = tls["mutual_tls"]["per_step_ms"]["p50"]
    out["plaintext_step_p50_ms"] = tls["plaintext"]["per_step_ms"]["p50"]
    return out


def print_summary(result: dict[str, Any]) -> None:
    m, wan, tls = result["machine"], result["wan"], result["tls"]
    other = m["cpu_during_run"]["other_cpu_share"]
    print(
        f"\nCorolla WAN benchmark ({result['mode']}), {m['cores']} cores, load {m['loadavg_at_start']}, "
        f"other processes took {other if other is None else f'{other:.0%}'} of the CPU meanwhile"
    )
    if "skipped" in wan:
        print(f"(a) skipped: {wan['skipped']}")
    else:
        c = wan["config"]
        print(
            f"(a) {c['hops']}-hop chain {', '.join(c['servers'])}, one namespace per process, mutual TLS; "
            f"{c['timed_steps']} steps per level"
        )
        print(
            "    over bound = step - hops x RTT; excess = step - (0 ms step + hops x RTT); "
            "echo = a bare TCP echo's round trip through such a proxy, minus RTT"
        )
        print(
            f"    {'RTT':>6} {'p50 ms':>8} {'mean ms':>8} {'steps/s':>8} {'bound':>8} {'ratio':>6} "
            f"{'over bound ms':>13} {'excess ms':>9} {'echo ms':>7} {'proxy late p99':>14}  tokens"
        )
        for level in wan["levels"]:
            s = level["per_step_ms"]
            bound = level["network_bound_steps_per_s"]
            ratio = level["ratio_to_bound"]
            late = max((p or {}).get("late_ms_p99", 0.0) for p in level["proxies"])
            excess = level.get("excess_ms_over_zero_rtt_step_plus_bound", {}).get("mean")
            print(
                f"    {level['rtt_ms']:>4g}ms {s['p50']:8.2f} {s['mean']:8.2f} {level['steps_per_s']:8.2f} "
                f"{'-' if bound is None else f'{bound:.2f}':>8} {'-' if ratio is None else f'{ratio:.3f}':>6} "
                f"{level['overhead_ms_per_step_over_bound']['mean']:13.2f} "
                f"{'-' if excess is None else f'{excess:.2f}':>9} "
                f"{level['echo_calibration']['excess_ms_over_rtt']:7.2f} {late:12.2f}ms  "
                f"{'= local' if level['tokens_match_local'] else 'DIFFER'}"
            )
    r = tls["ratios"]
    t, p = tls["mutual_tls"]["per_step_ms"], tls["plaintext"]["per_step_ms"]
    print(
        f"(b) loopback, 2 servers {', '.join(tls['config']['servers'])}, {tls['config']['new_tokens']} tokens x "
        f"{tls['config']['repeats']} interleaved"
    )
    print(
        f"    mutual TLS p50 {t['p50']:.3f} ms mean {t['mean']:.3f} ms; plaintext p50 {p['p50']:.3f} ms mean "
        f"{p['mean']:.3f} ms; TLS / plaintext: p50 x{r['tls_over_plaintext_step_p50']:.3f}, mean "
        f"x{r['tls_over_plaintext_step_mean']:.3f}, paired rounds x{r['tls_over_plaintext_paired_round_median']:.3f}"
    )
    warn_if_loaded(m, "; re-run on an idle machine before quoting figures.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    run = Run("wan", quick=args.quick, machine=machine_info(**torch_stack()))
    result = run.result
    with tempfile.TemporaryDirectory(prefix="corolla-wan-") as tmp:
        result["wan"] = bench_wan(plan.wan, Path(tmp))
        result["tls"] = bench_tls(plan.tls, Path(tmp))
    result["headline"] = headline(result["wan"], result["tls"])
    run.finish(args.out)
    print_summary(result)
    run.print_written()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
