"""Secure aggregation benchmark: Corolla's protocol against Flower's SecAgg+, in one process run.

Per round, for 1M parameters with 5 and 10 sites and 4M parameters with 10 sites, all sites
and the coordinator run in this one process, one after the other, on the same float32
updates (N(0, 0.01), as DP-noised LoRA deltas are small):

- `plain`: the coordinator sums the float32 vectors (what aggregation in the clear costs);
- `corolla`: `corolla.secure_agg` with real certificates (a throw-away consortium CA), the
  default (secure) threshold, every phase timed: the coordinator's announcement, each
  site's `site_upload`, the coordinator's `add_upload`, `unmask_requests`, each site's
  `site_unmask`, `add_unmask_reply`, `result`; plus a row with two dropouts (one site
  never uploads, one never answers the unmask request);
- `flower_secaggplus`: Flower 1.42's own `SecAggPlusWorkflow` (ServerApp side) driving
  Flower's `secaggplus_mod` (ClientApp side) through an in-process `Grid` that hands each
  message (deep-copied, as the network would) to the destination's mod; every client in
  the complete graph (`num_shares=1.0`: all pairs, as Corolla), the same threshold, the
  clipping range R = 1.0. Its four stages are timed, client time apart from server time;
  the deep copies (transport) and the ClientApp's training reply (`call_next`) are not
  counted.

Overhead = round time - plain time; the target is Flower's overhead / Corolla's >= 5. Bytes
uploaded per parameter count what each site sends the coordinator (Corolla: the upload and
the unmask reply; Flower: the bytes in the replies' records, the masked vector as int64 npy).

Results go to `benchmarks/results/secure_agg.json`; a summary is printed.

    python benchmarks/secure_agg.py            # full run, about a minute on 2 cores
    python benchmarks/secure_agg.py --quick    # smoke run, under a minute (10x smaller vectors)
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Opacus ships a top-level `benchmarks` package that shadows this directory: import the
# shared helpers by path, as training.py does.
sys.path[:0] = [str(HERE)]

import cryptography  # noqa: E402
import flwr  # noqa: E402
import numpy as np  # noqa: E402
from _results import Run, machine_info, warn_if_loaded  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server import ServerConfig  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402
from flwr.server.compat.legacy_context import LegacyContext  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from corolla.pki import ConsortiumCA  # noqa: E402
from corolla.secure_agg import (  # noqa: E402
    Aggregator,
    CoordinatorKeys,
    FixedPoint,
    Member,
    SiteKeys,
    secure_threshold,
    site_unmask,
    site_upload,
)

RESULTS = HERE / "results" / "secure_agg.json"
TARGET_OVERHEAD_RATIO = 5.0  # Flower's overhead / Corolla's, at least
TARGET_BYTES_PER_PARAM = 4.0  # Corolla's upload, at most
CLIP = 1.0  # R for both protocols (Flower's clipping_range)
FLOWER_PULL_INTERVAL_S = 3.0  # flwr 1.42 Grid.send_and_receive pulls every 3 s (rounds.py)


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    params: int  # parameters per update
    sites: int
    dropouts: bool = False  # Corolla only: one site never uploads, one never answers the unmask request

    @property
    def name(self) -> str:
        return f"{self.params // 1000}k_{self.sites}_sites" + ("_2_dropouts" if self.dropouts else "")


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    cases: tuple[Case, ...]
    repeats: int  # rounds per case and protocol, interleaved


FULL = Plan(
    cases=(
        Case(params=1_000_000, sites=5),
        Case(params=1_000_000, sites=10),
        Case(params=4_000_000, sites=10),
        Case(params=1_000_000, sites=10, dropouts=True),
    ),
    repeats=5,
)
QUICK = Plan(
    cases=(
        Case(params=100_000, sites=5),
        Case(params=100_000, sites=10),
        Case(params=400_000, sites=10),
        Case(params=100_000, sites=10, dropouts=True),
    ),
    repeats=1,
)


# -- Corolla ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CorollaConsortium:
    sites: tuple[SiteKeys, ...]
    members: tuple[Member, ...]
    coordinator: CoordinatorKeys
    verifier: Any

    @classmethod
    def create(cls, root: Path, sites: int) -> CorollaConsortium:
        ca = ConsortiumCA.init(root, consortium="bench")
        nodes = sorted((ca.issue(f"site-{i}", "site") for i in range(sites)), key=lambda n: n.node_id)
        coordinator = ca.issue("coordinator", "coordinator")
        return cls(
            sites=tuple(
                SiteKeys(node_id=n.node_id, identity_key=n.identity_key_raw(), agreement_key=n.agreement_key_raw())
                for n in nodes
            ),
            members=tuple(
                Member(node_id=n.node_id, identity_cert=n.identity_cert_der, agreement_cert=n.agreement_cert_der)
                for n in nodes
            ),
            coordinator=CoordinatorKeys(
                node_id=coordinator.node_id,
                identity_key=coordinator.identity_key_raw(),
                identity_cert=coordinator.identity_cert_der,
            ),
            verifier=coordinator.verifier(),
        )


def corolla_round(
    consortium: CorollaConsortium, case: Case, inputs: Sequence[np.ndarray], round_: int
) -> dict[str, Any]:
    n, d = case.sites, case.params
    t: dict[str, float] = {}
    began = time.perf_counter()
    agg = Aggregator(
        run_id="bench",
        round=round_,
        members=consortium.members[:n],
        encoding=FixedPoint.for_sites(n, clip=CLIP),
        length=d,
        coordinator=consortium.coordinator,
        verifier=consortium.verifier,
    )
    t["coordinator_announce"] = time.perf_counter() - began
    keys = {k.node_id: k for k in consortium.sites[:n]}
    ids = list(agg.roster)
    never_upload = {ids[1]} if case.dropouts else set()
    never_answer = {ids[n // 2]} if case.dropouts else set()
    states: dict[str, bytes] = {}
    site_upload_s: list[float] = []
    upload_bytes: list[int] = []
    t["coordinator_add_upload"] = 0.0
    for k, node_id in enumerate(ids):
        if node_id in never_upload:
            continue
        t0 = time.perf_counter()
        up = site_upload(agg.announcement, inputs[k], keys[node_id], consortium.verifier)
        t1 = time.perf_counter()
        agg.add_upload(up.upload)
        t["coordinator_add_upload"] += time.perf_counter() - t1
        site_upload_s.append(t1 - t0)
        upload_bytes.append(len(up.upload))
        header_bytes = len(up.upload) - 4 * d  # prefix, JSON header (with the sealed shares), signature
        states[node_id] = up.state
        del up
    t["sites_upload"] = sum(site_upload_s)
    t0 = time.perf_counter()
    requests = agg.unmask_requests()
    t["coordinator_unmask_requests"] = time.perf_counter() - t0
    site_unmask_s: list[float] = []
    reply_bytes: list[int] = []
    t["coordinator_add_unmask_reply"] = 0.0
    for node_id, request in requests.items():
        if node_id in never_answer:
            continue
        t0 = time.perf_counter()
        reply = site_unmask(request, states.pop(node_id), keys[node_id])
        t1 = time.perf_counter()
        agg.add_unmask_reply(reply)
        t["coordinator_add_unmask_reply"] += time.perf_counter() - t1
        site_unmask_s.append(t1 - t0)
        reply_bytes.append(len(reply))
    t["sites_unmask"] = sum(site_unmask_s)
    t0 = time.perf_counter()
    result = agg.result()
    t["coordinator_result"] = time.perf_counter() - t0
    survivors = [k for k, i in enumerate(ids) if i not in never_upload]
    exact = np.sum([np.clip(inputs[k], -CLIP, CLIP).astype(np.float64) for k in survivors], axis=0)
    return {
        "seconds": t,
        "total_s": sum(t.values()),
        "coordinator_s": sum(v for k, v in t.items() if k.startswith("coordinator")),
        "sites_s": t["sites_upload"] + t["sites_unmask"],
        "site_upload_mean_s": statistics.fmean(site_upload_s),
        "site_unmask_mean_s": statistics.fmean(site_unmask_s),
        "threshold": agg.threshold,
        "survivors": result.count,
        "answered": len(result.answered),
        "max_abs_error_vs_float64_sum": float(np.max(np.abs(result.total.astype(np.float64) - exact))),
        "bytes": {
            "announcement": len(agg.announcement),
            "upload_per_site": statistics.fmean(upload_bytes),
            "upload_header_per_site": header_bytes,
            "unmask_request_per_site": statistics.fmean(len(r) for r in requests.values()),
            "unmask_reply_per_site": statistics.fmean(reply_bytes),
        },
    }


# -- Flower SecAgg+ -----------------------------------------------------------------------------


class InProcessGrid(Grid):
    """Flower's `Grid` for one process: each message goes, deep-copied, to its destination
    node's `secaggplus_mod`, whose ClientApp returns the node's precomputed update."""

    def __init__(self, updates: dict[int, np.ndarray]) -> None:
        self.updates = updates
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={}) for node in updates
        }
        self.client_s = 0.0  # inside secaggplus_mod, minus call_next
        self.train_s = 0.0  # call_next: the ClientApp's training reply (not counted)
        self.transport_s = 0.0  # deep copies of messages and replies (not counted)
        self.reply_bytes: list[int] = []  # per reply, client -> server
        self.stage_client_s: list[float] = []

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.updates)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        stage_client = 0.0
        for message in messages:
            t0 = time.perf_counter()
            message = copy.deepcopy(message)
            self.transport_s += time.perf_counter() - t0
            node = message.metadata.dst_node_id
            train = [0.0]

            def call_next(msg: Message, ctxt: Context, node: int = node, train: list[float] = train) -> Message:
                t0 = time.perf_counter()
                fitres = FitRes(
                    status=Status(Code.OK, ""),
                    parameters=ndarrays_to_parameters([self.updates[node]]),
                    num_examples=1,
                    metrics={},
                )
                reply = Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
                train[0] += time.perf_counter() - t0
                return reply

            t0 = time.perf_counter()
            reply = secaggplus_mod(message, self.contexts[node], call_next)
            spent = time.perf_counter() - t0 - train[0]
            self.client_s += spent
            stage_client += spent
            self.train_s += train[0]
            self.reply_bytes.append(record_bytes(reply.content))
            t0 = time.perf_counter()
            replies.append(copy.deepcopy(reply))
            self.transport_s += time.perf_counter() - t0
        self.stage_client_s.append(stage_client)
        return replies


def record_bytes(content: RecordDict) -> int:
    """Bytes in a reply's records: bytes values and arrays, 8 per number (no framing)."""
    total = 0
    for config in content.config_records.values():
        for value in config.values():
            values: list[Any] = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in values)
    for arrays in content.array_records.values():
        total += sum(len(array.data) for array in arrays.values())
    return total


class TimedWorkflow(SecAggPlusWorkflow):
    """Flower's workflow with its four stages timed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage_s: list[float] = []

    def _timed(self, stage: Any, grid: Any, context: Any, state: Any) -> bool:
        t0 = time.perf_counter()
        ok = bool(stage(grid, context, state))
        self.stage_s.append(time.perf_counter() - t0)
        return ok

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._timed(super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._timed(super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._timed(super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._timed(super().unmask_stage, grid, context, state)


def flower_round(case: Case, inputs: Sequence[np.ndarray]) -> dict[str, Any]:
    n, d = case.sites, case.params
    grid = InProcessGrid({k + 1: x for k, x in enumerate(inputs)})
    manager = SimpleClientManager()
    for node in grid.updates:
        manager.register(GridClientProxy(node, grid, 1))
    base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n, fraction_evaluate=0.0)
    context = LegacyContext(base, config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    context.state.config_records["config"] = ConfigRecord({"current_round": 1})
    context.state.array_records["parameters"] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(d, np.float32)]), keep_input=True
    )
    workflow = TimedWorkflow(num_shares=1.0, reconstruction_threshold=secure_threshold(n), clipping_range=CLIP)
    t0 = time.perf_counter()
    workflow(grid, context)
    wall = time.perf_counter() - t0
    counted = wall - grid.transport_s - grid.train_s
    aggregate = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(context.state.array_records["parameters"], keep_input=True)
    )[0]
    mean = np.mean([np.clip(x, -CLIP, CLIP).astype(np.float64) for x in inputs], axis=0)
    stage_names = ("setup", "share_keys", "collect_masked_vectors", "unmask")
    if len(workflow.stage_s) != 4:
        raise RuntimeError(f"Flower's workflow stopped after {len(workflow.stage_s)} stages")
    return {
        "total_s": counted,
        "clients_s": grid.client_s,
        "server_s": counted - grid.client_s,
        "stages": {
            name: {"wall_s": wall_s, "clients_s": clients_s}
            for name, wall_s, clients_s in zip(stage_names, workflow.stage_s, grid.stage_client_s, strict=True)
        },
        "not_counted": {"transport_deep_copies_s": grid.transport_s, "client_training_reply_s": grid.train_s},
        "threshold": secure_threshold(n),
        "max_abs_error_of_mean_vs_float64_mean": float(np.max(np.abs(aggregate.astype(np.float64) - mean))),
        "bytes": {"client_to_server_per_client": sum(grid.reply_bytes) / n},
    }


# -- plain --------------------------------------------------------------------------------------


def plain_round(inputs: Sequence[np.ndarray]) -> float:
    t0 = time.perf_counter()
    total = np.zeros_like(inputs[0])
    for x in inputs:
        np.add(total, x, out=total)
    return time.perf_counter() - t0


# -- driver -------------------------------------------------------------------------------------


def bench_case(case: Case, consortium: CorollaConsortium, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(case.params + case.sites)
    inputs = [rng.normal(0.0, 0.01, case.params).astype(np.float32) for _ in range(case.sites)]
    plain: list[float] = []
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for r in range(repeats):
        # interleaved, order rotated, so that drifting background load hits every variant alike
        runs: list[Callable[[], None]] = [
            lambda: plain.append(plain_round(inputs)),
            lambda r=r: ours.append(corolla_round(consortium, case, inputs, r + 1)),  # type: ignore[misc]
        ]
        if not case.dropouts:
            runs.append(lambda: theirs.append(flower_round(case, inputs)))
        for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
            gc.collect()
            run()
    plain_s = statistics.median(plain)
    corolla = _median_run(ours)
    out: dict[str, Any] = {"case": asdict(case), "plain_s": plain_s, "corolla": corolla}
    corolla["overhead_s"] = corolla["total_s"] - plain_s
    corolla["total_over_plain"] = corolla["total_s"] / plain_s
    corolla["bytes"]["upload_per_param"] = corolla["bytes"]["upload_per_site"] / case.params
    corolla["bytes"]["site_to_coordinator_per_param"] = (
        corolla["bytes"]["upload_per_site"] + corolla["bytes"]["unmask_reply_per_site"]
    ) / case.params
    corolla["rounds_s"] = [round(o["total_s"], 4) for o in ours]
    if theirs:
        flower = _median_run(theirs)
        flower["overhead_s"] = flower["total_s"] - plain_s
        flower["total_over_plain"] = flower["total_s"] / plain_s
        flower["bytes"]["client_to_server_per_param"] = flower["bytes"]["client_to_server_per_client"] / case.params
        flower["rounds_s"] = [round(f["total_s"], 4) for f in theirs]
        out["flower_secaggplus"] = flower
        out["overhead_ratio_flower_over_corolla"] = flower["overhead_s"] / corolla["overhead_s"]
        out["overhead_ratio_paired_rounds"] = [
            round((f["total_s"] - p) / (o["total_s"] - p), 3) for f, o, p in zip(theirs, ours, plain, strict=True)
        ]
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose total is the median (its phases stay consistent with each other)."""
    ordered = sorted(runs, key=lambda r: r["total_s"])
    return copy.deepcopy(ordered[len(ordered) // 2])


def targets(cases: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, case in cases.items():
        if "overhead_ratio_flower_over_corolla" in case:
            ratio = case["overhead_ratio_flower_over_corolla"]
            out[f"overhead_ratio_{name}"] = {
                "value": round(ratio, 3),
                "limit": TARGET_OVERHEAD_RATIO,
                "pass": ratio >= TARGET_OVERHEAD_RATIO,
                "note": "Flower SecAgg+ overhead / Corolla overhead, compute in one process, median round",
            }
        b = case["corolla"]["bytes"]
        marginal = (b["upload_per_site"] - b["upload_header_per_site"]) / case["case"]["params"]
        out[f"bytes_per_param_{name}"] = {
            "value": round(b["upload_per_param"], 4),
            "marginal": marginal,
            "limit": TARGET_BYTES_PER_PARAM,
            "pass": marginal <= TARGET_BYTES_PER_PARAM,
            "note": (
                "value: a site's upload / parameters; marginal: the masked vector alone (4 bytes per parameter); "
                "the rest is a per-site constant (header, about n(n-1) x 90 bytes of sealed shares), and the unmask "
                f"reply adds {b['unmask_reply_per_site']:.0f} bytes per site"
            ),
        }
    return out


def summary(cases: dict[str, Any], checks: dict[str, Any]) -> dict[str, Any]:
    """Per case: both overheads, their ratio and the bytes per parameter, each against its
    target; and whether every target is met."""
    per_case: dict[str, Any] = {}
    for name, case in cases.items():
        row: dict[str, Any] = {
            "corolla_overhead_s": round(case["corolla"]["overhead_s"], 4),
            "upload_bytes_per_param": round(case["corolla"]["bytes"]["upload_per_param"], 4),
            "bytes_target_met": checks[f"bytes_per_param_{name}"]["pass"],
        }
        if "overhead_ratio_flower_over_corolla" in case:
            row["flower_overhead_s"] = round(case["flower_secaggplus"]["overhead_s"], 4)
            row["overhead_ratio"] = round(case["overhead_ratio_flower_over_corolla"], 2)
            row["overhead_ratio_paired_rounds_min"] = min(case["overhead_ratio_paired_rounds"])
            row["ratio_target_met"] = checks[f"overhead_ratio_{name}"]["pass"]
        per_case[name] = row
    return {
        "targets": f"overhead ratio >= {TARGET_OVERHEAD_RATIO}x (Flower SecAgg+ / Corolla), "
        f"<= {TARGET_BYTES_PER_PARAM} bytes per parameter (the masked vector)",
        "all_targets_met": all(t["pass"] for t in checks.values()),
        "cases": per_case,
    }


def print_summary(result: dict[str, Any]) -> None:
    m = result["machine"]
    other = m["cpu_during_run"]["other_cpu_share"]
    print(
        f"\nSecure aggregation benchmark ({result['mode']}), {m['cores']} cores, load {m['loadavg_at_start']}, "
        f"other processes took {other if other is None else f'{other:.0%}'} of the CPU meanwhile"
    )
    print(f"    {'case':26} {'plain':>8} {'corolla':>9} {'flower':>9} {'overhead ratio':>15} {'B/param':>8}")
    for name, case in result["cases"].items():
        flower = case.get("flower_secaggplus")
        flower_s = f"{flower['total_s']:8.3f}s" if flower else f"{'-':>9}"
        ratio = case.get("overhead_ratio_flower_over_corolla")
        ratio_s = f"{ratio:14.2f}x" if ratio else f"{'-':>15}"
        print(
            f"    {name:26} {case['plain_s'] * 1000:6.1f}ms {case['corolla']['total_s']:8.3f}s {flower_s} {ratio_s}"
            f" {case['corolla']['bytes']['upload_per_param']:8.4f}"
        )
        c = case["corolla"]["seconds"]
        print(
            "      corolla: "
            + ", ".join(f"{k} {v * 1000:.0f}ms" for k, v in c.items())
            + f"; max|err| {case['corolla']['max_abs_error_vs_float64_sum']:.1e}"
        )
        if flower:
            print(
                "      flower:  "
                + ", ".join(f"{k} {v['wall_s'] * 1000:.0f}ms" for k, v in flower["stages"].items())
                + f" (clients {flower['clients_s'] * 1000:.0f}ms); "
                f"{flower['bytes']['client_to_server_per_param']:.2f} B/param uploaded"
            )
    for name, target in result["targets"].items():
        marginal = f"marginal {target['marginal']}, " if "marginal" in target else ""
        verdict = "PASS" if target["pass"] else "FAIL"
        print(f"    target {name}: {target['value']} ({marginal}limit {target['limit']}) {verdict}")
    print(f"    all targets met: {result['summary']['all_targets_met']}")
    warn_if_loaded(m, "; re-run on an idle machine.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run (under a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    logging.getLogger("flwr").setLevel(logging.ERROR)  # one INFO line per stage otherwise
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process sets
    run = Run(
        "secure_agg",
        quick=args.quick,
        machine={
            **machine_info(),
            "numpy": np.__version__,
            "cryptography": cryptography.__version__,
            "flwr": flwr.__version__,
        },
    )
    result = run.result
    result["settings"] = {
        "repeats": plan.repeats,
        "clip_R": CLIP,
        "inputs": "N(0, 0.01) float32 per site, the same for every protocol",
        "threshold": "corolla.secure_agg.secure_threshold(n) for both (n=5: 4, n=10: 6)",
        "flower": "SecAggPlusWorkflow(num_shares=1.0 (all pairs), reconstruction_threshold=t, "
        "clipping_range=1.0, quantization_range=2^22, modulus_range=2^32) with secaggplus_mod",
        "message_stages": {
            "corolla": "2: the upload rides on the train reply, plus one unmask exchange",
            "flower_secaggplus": "4: setup, share keys, collect masked vectors (the train reply), unmask",
            "note": f"in deployment each extra exchange costs at least one Grid pull interval "
            f"({FLOWER_PULL_INTERVAL_S:.0f} s in flwr 1.42): not part of the compute figures here",
        },
    }
    cases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="corolla-secagg-bench-") as tmp:
        consortium = CorollaConsortium.create(Path(tmp), max(c.sites for c in plan.cases))
        for case in plan.cases:
            print(f"{case.name} ...", flush=True)
            cases[case.name] = bench_case(case, consortium, plan.repeats)
    result["cases"] = cases
    result["targets"] = targets(cases)
    result["summary"] = summary(cases, result["targets"])
    run.finish(args.out)
    print_summary(result)
    run.print_written()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
