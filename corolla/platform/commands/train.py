"""`platform train`: federated DP fine-tuning of a LoRA adapter through the swarm.

With no `--superlink`, a local consortium is started for the run (`--local-servers` block
servers, a SuperLink, one SuperNode per site, all real processes with a throwaway CA) on the
workspace's tiny Llama and synthetic clinical notes, unless `--model`/`--data` say
otherwise. With `--superlink HOST:PORT` the run is submitted to an existing federation.
`--in-process` trains in this process without Flower (the reference for the federated run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from corolla.federation.outcomes import ProgressEvent
from corolla.platform.commands._flags import add_renamed, server_count
from corolla.platform.metrics_args import add_metrics_options, start_metrics
from corolla.platform.workspace import resolve_workspace
from corolla.training.config import PRETRAINED_DEFAULTS, TrainConfig, TrainConfigError
from corolla.verify.ledger_paths import default_ledger_key_path, default_ledger_url

OnEvent = Callable[[ProgressEvent], None]

_DP_OFF_WARNING = """\
WARNING: differential privacy is OFF (--dp-epsilon off).
WARNING: site updates are not clipped or noised: they can reveal the sites' training records.
WARNING: use this only with synthetic or public data."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    p = sub.add_parser(
        "train",
        help="federated DP fine-tuning of a LoRA adapter",
        description="Fine-tune a LoRA adapter with DP-SGD at every site, combined round by round with Flower.",
    )
    p.add_argument(
        "--adapter",
        default="lora",
        choices=["lora"],
        metavar="KIND",
        help="adapter kind: lora (the only one for now); `generate --adapter-dir DIR` applies the result",
    )
    dp = p.add_argument_group("differential privacy")
    dp.add_argument("--dp-epsilon", type=_epsilon, metavar="FLOAT|off", help="each site's total budget (default 3)")
    dp.add_argument("--dp-delta", type=float, metavar="F", help="default: below 1/N of each site's records")
    dp.add_argument("--max-grad-norm", type=float, metavar="F", help="per-sample clipping bound (default 1.0)")
    dp.add_argument("--exchange", choices=["flat", "per-sample"], help="how servers give DP-SGD what it needs")
    opt = p.add_argument_group("training")
    opt.add_argument("--rounds", type=int, metavar="N")
    opt.add_argument("--steps-per-round", type=int, metavar="N")
    opt.add_argument("--batch-size", type=int, metavar="N", help="expected batch size (Poisson sampling)")
    opt.add_argument("--lr", type=float, metavar="F")
    opt.add_argument("--lora-r", type=int, metavar="N")
    opt.add_argument("--lora-alpha", type=float, metavar="F")
    opt.add_argument("--targets", type=_targets, metavar="q_proj,v_proj", help="module names that get LoRA weights")
    opt.add_argument("--max-length", type=int, metavar="N", help="longest record, tokens")
    opt.add_argument("--seed", type=int, metavar="N", help="data split, sampling and noise seed")
    opt.add_argument("--round-timeout", type=float, metavar="S", help="seconds to wait for a round's replies")
    opt.add_argument(
        "--no-secure-agg",
        action="store_true",
        help="aggregate site updates in the clear: the coordinator sees each one (sites must set allow-plain-updates)",
    )
    verify = p.add_argument_group("verification")
    verify.add_argument(
        "--audit-rate",
        type=float,
        metavar="R",
        help="fraction of span computations spot-checked (default 0.05; 0 = none)",
    )
    verify.add_argument(
        "--ledger", metavar="URL", help="reputation ledger: sqlite path or postgresql://... (default: the workspace's)"
    )
    verify.add_argument(
        "--tolerances",
        type=Path,
        metavar="FILE",
        help="tolerance table from `platform audit calibrate --model DIR --out FILE`, read on the "
        "coordinator's machine and sent to every site (default: the shipped table: entries for tiny random "
        "models and SmolLM2-135M, a fallback for others)",
    )
    opt.add_argument(
        "--secure-agg-clip",
        type=float,
        metavar="R",
        help="secure aggregation encodes update values in [-R, R] (default 1.0; values outside are clipped)",
    )
    where = p.add_argument_group("where")
    where.add_argument("--model", metavar="DIR", help="base model checkpoint (default: the workspace's tiny Llama)")
    where.add_argument(
        "--data", nargs="+", type=Path, metavar="JSONL", help="one JSONL per site, or one directory of them"
    )
    where.add_argument(
        "--test-data",
        type=Path,
        metavar="JSONL",
        help="held-out records the coordinator scores (with --data or --superlink; alone it is a usage error)",
    )
    add_renamed(
        where,
        "--out-dir",
        "--out",
        type=Path,
        metavar="DIR",
        help="directory for the adapter, progress.jsonl and summary.json",
    )
    where.add_argument(
        "--sites",
        type=int,
        metavar="N",
        help="sites of the local consortium (default 3); with --superlink, sites the first round waits for",
    )
    add_renamed(
        where,
        "--local-servers",
        "--servers",
        old_type=server_count,
        type=int,
        default=2,
        metavar="N",
        help="block servers the local consortium starts (default 2); the old spelling --servers is read by its "
        "value: a number is this count, an endpoint HOST:PORT is refused (train finds servers through --peers)",
    )
    where.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="K",
        help="servers per span among the --local-servers (must divide it; spot checks need 2-3)",
    )
    # Tests and benchmarks only: local server INDEX corrupts outputs (`platform serve --inject-fault`).
    where.add_argument("--inject-fault", action="append", default=[], type=_fault, help=argparse.SUPPRESS)
    # Tests only: each local site keeps the updates it contributed in its store (keep-updates node config).
    where.add_argument("--keep-site-updates", action="store_true", help=argparse.SUPPRESS)
    mode = where.add_mutually_exclusive_group()
    mode.add_argument("--superlink", metavar="HOST:PORT", help="submit to this federation instead of a local one")
    add_renamed(
        mode,
        "--in-process",
        "--local",
        action="store_true",
        help="train in this process, without Flower or block servers (the reference run)",
    )
    where.add_argument(
        "--superlink-ca", type=Path, metavar="PEM", help="CA of the SuperLink (default: the workspace's)"
    )
    where.add_argument(
        "--peers", action="append", default=[], metavar="MULTIADDR", help="DHT peer of the swarm (with --superlink)"
    )
    where.add_argument("--node", help="the coordinator's node name in the workspace (with --superlink)")
    where.add_argument("--workspace", help="state directory (default ~/.corolla or $COROLLA_WORKSPACE)")
    add_metrics_options(p)
    p.set_defaults(run=run)


def _epsilon(value: str) -> float | str:
    """A positive float, or "off" (kept as the string, so that it differs from "not given")."""
    if value.strip().lower() == "off":
        return "off"
    try:
        epsilon = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give a positive number or 'off'") from None
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise argparse.ArgumentTypeError(f"{value}: epsilon must be a positive number (or 'off' for no DP)")
    return epsilon


def _targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


_TRAIN_FLAGS = (
    "rounds",
    "steps_per_round",
    "batch_size",
    "lr",
    "lora_r",
    "lora_alpha",
    "targets",
    "dp_delta",
    "max_grad_norm",
    "exchange",
    "max_length",
    "seed",
    "round_timeout",
    "secure_agg_clip",
    "audit_rate",
    "ledger",
)


def _fault(text: str) -> tuple[int, str]:
    """`INDEX=KIND:FRACTION[:SEED]`: which local server injects which fault."""
    index, sep, spec = text.partition("=")
    if not sep or not index.isdigit() or not spec:
        raise argparse.ArgumentTypeError(f"--inject-fault {text!r}: expected INDEX=KIND:FRACTION, e.g. 0=noise:1.0")
    return int(index), spec


def config_from_args(args: argparse.Namespace, *, scale: dict[str, Any] | None = None, **where: Any) -> TrainConfig:
    """The run's settings: the flags given, then `scale` (settings for the model's size), then
    TrainConfig's defaults."""
    kwargs = dict(scale or {})
    kwargs.update({name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name) is not None})
    if args.dp_epsilon is not None:
        kwargs["dp_epsilon"] = None if args.dp_epsilon == "off" else args.dp_epsilon
    if args.tolerances is not None:  # absolute: the coordinator reads it from its own working directory
        kwargs["tolerances"] = str(args.tolerances.expanduser().resolve())
    return TrainConfig(**kwargs, secure_agg=not args.no_secure_agg, **where)


def _check_tolerances(args: argparse.Namespace, config: TrainConfig) -> None:
    """A table that cannot be read or is not a table: a clear error (exit 13) before anything starts."""
    if not config.tolerances:
        return
    from corolla.verify.tolerance import load_table

    load_table(config.tolerances)
    if config.audit_rate == 0 or args.in_process:
        print("note: --tolerances has no effect without spot checks (--audit-rate 0 or --in-process)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    checked = config_from_args(args, model="-", out_dir="-")  # bad flags fail here, before anything starts
    # Without --data a local run trains on synthetic notes: --test-data would be ignored, silently.
    if args.test_data and not args.data and not args.superlink:
        raise TrainConfigError(
            f"--test-data {str(args.test_data)!r} needs --data: give the sites' JSONL files too "
            "(without --data, sites and held-out records are synthetic)"
        )
    _check_tolerances(args, checked)
    workspace = resolve_workspace(args.workspace)
    root = workspace / "train-local"
    out_dir = (args.out_dir or root / "out").resolve()
    if args.dp_epsilon == "off":
        print(_DP_OFF_WARNING, file=sys.stderr, flush=True)
    if args.no_secure_agg:
        print(
            "note: --no-secure-agg: site updates are aggregated in the clear; the coordinator sees each site's update",
            file=sys.stderr,
            flush=True,
        )
    with _coordinator_metrics(args) as on_event:
        summary = (_submit if args.superlink else _run_here)(args, workspace, root, out_dir, on_event)
    print(f"adapter: {summary.get('adapter')}")
    final = summary.get("final") or {}
    if final:
        print("held-out: " + "  ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, int | float)))
    return 0


@contextlib.contextmanager
def _coordinator_metrics(args: argparse.Namespace) -> Iterator[OnEvent | None]:
    """With --metrics-port: /metrics kept from the run's progress events, /health ready once the
    run has started (its first event). Not with --in-process (no run to follow)."""
    if args.metrics_port is None:
        yield None
        return
    if args.in_process:
        raise TrainConfigError("--metrics-port needs a federated run: --in-process has no coordinator to watch")
    from prometheus_client import ProcessCollector

    from corolla.metrics import CoordinatorMetrics, Readiness
    from corolla.platform.launch.run_metrics import record

    metrics = CoordinatorMetrics()
    ProcessCollector(registry=metrics.registry)
    readiness = Readiness()
    endpoint = start_metrics(args, metrics.registry, readiness)

    def on_event(event: ProgressEvent) -> None:
        readiness.ready()
        record(metrics, event)

    try:
        yield on_event
    finally:
        if endpoint is not None:
            endpoint.close()


def _run_here(
    args: argparse.Namespace, workspace: Path, root: Path, out_dir: Path, on_event: OnEvent | None = None
) -> dict[str, Any]:
    from corolla.inference.models.checkpoint import Checkpoint
    from corolla.platform.launch.train_run import LocalConsortiumRun, prepare_data
    from corolla.training.base_model import default_training_model

    model = Path(args.model).expanduser() if args.model else default_training_model(workspace)
    Checkpoint.open(model)  # a missing or unreadable model is a clear error before anything starts
    sites = args.sites if args.sites is not None else (0 if args.data else 3)
    if args.data and args.sites is not None:
        raise TrainConfigError("--sites and --data exclude each other: with --data there is one site per file")
    if not args.data and sites < 1:
        raise TrainConfigError(f"--sites {sites}: at least 1 site is needed")
    site_data, test_data = prepare_data(
        root / "data", sites=sites, seed=args.seed or 0, given=args.data or (), test=args.test_data
    )
    config = config_from_args(
        args,
        scale=_scale_defaults(args, Checkpoint.open(model).hidden_size),
        model=str(model.resolve()),
        out_dir=str(out_dir),
        test_data=str(test_data),
        sites=len(site_data),
    )
    if args.in_process:
        from corolla.federation.local import run_local

        return run_local(config, site_data, test_data).to_json()
    if args.local_servers < 1:
        raise TrainConfigError(f"--local-servers {args.local_servers}: at least 1 block server is needed")
    if args.replicas < 1 or args.local_servers % args.replicas:
        raise TrainConfigError(f"--replicas {args.replicas} must divide --local-servers {args.local_servers}")
    if not args.ledger:  # the workspace's ledger outlives the throwaway consortium; `platform audit` reads it
        config = dataclasses.replace(
            config, ledger=default_ledger_url(workspace), ledger_key=str(default_ledger_key_path(workspace))
        )
    launcher = LocalConsortiumRun(
        config,
        root=root,
        servers=args.local_servers,
        replicas=args.replicas,
        site_data=site_data,
        test_data=test_data,
        faults=dict(args.inject_fault),
        keep_updates=args.keep_site_updates,
    )
    launcher.on_event = on_event
    return launcher.run()


def _scale_defaults(args: argparse.Namespace, hidden_size: int) -> dict[str, Any]:
    """PRETRAINED_DEFAULTS for a pretrained-size model, less what flags give; says so."""
    if not PRETRAINED_DEFAULTS.applies(hidden_size):
        return {}
    chosen = {k: v for k, v in PRETRAINED_DEFAULTS.settings().items() if getattr(args, k) is None}
    if chosen:
        shown = ", ".join(
            f"{k.replace('_', '-')} {','.join(v) if isinstance(v, tuple) else v}" for k, v in chosen.items()
        )
        print(f"a model of hidden size {hidden_size}: {shown} (flags override)", file=sys.stderr, flush=True)
    return chosen


def _submit(
    args: argparse.Namespace, workspace: Path, root: Path, out_dir: Path, on_event: OnEvent | None = None
) -> dict[str, Any]:
    from corolla.platform.flower import ControlClient, SuperLinkConnection
    from corolla.platform.launch.train_run import submit

    if args.data:
        raise TrainConfigError("--data is for local runs: with --superlink each site reads its own data")
    if not args.model:
        raise TrainConfigError("--superlink needs --model: the checkpoint directory on the coordinator's machine")
    if not args.peers:
        raise TrainConfigError("--superlink needs --peers: the DHT of the swarm serving the model")
    ca = args.superlink_ca or (workspace / "nodes" / args.node / "ca.pem" if args.node else workspace / "ca" / "ca.pem")
    config = config_from_args(
        args,
        model=str(Path(args.model).expanduser()),
        out_dir=str(out_dir),
        test_data=str(args.test_data.resolve()) if args.test_data else "",
        peers=tuple(args.peers),
        workspace=str(workspace) if args.node else "",
        node=args.node or "",
        sites=args.sites or 0,
    )
    control = ControlClient(SuperLinkConnection(address=args.superlink, root_certificates=ca), work_dir=root / "cli")
    return submit(config, control, on_event=on_event)
