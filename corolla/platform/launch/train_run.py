"""`platform train` from this machine: a local consortium of real processes, or a run
submitted to an existing federation, followed round by round.

The local consortium (`LocalConsortiumRun`) is what a real one is, on 127.0.0.1: a throwaway
CA with server, site and coordinator identities; `platform serve` block servers with mutual
TLS; a `flower-superlink` serving the coordinator's TLS certificate with SuperNode
authentication; one `flower-supernode` per site, enrolled after its certificate is checked,
whose node config says where its data and private store are. Everything is stopped at the
end, also on errors and Ctrl-C.

Progress is read from `<out_dir>/progress.jsonl` as the ServerApp writes it. A ServerApp on
another machine writes that file there: the events are then taken from the run's log when
the run ends (`progress.events_from_log`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from corolla.errors import CorollaError
from corolla.federation import app_dir
from corolla.federation.outcomes import DoneEvent, ProgressEvent, RoundEvent, StepEvent
from corolla.federation.progress import PROGRESS_FILE, events_from_log, follow, format_event
from corolla.federation.view import ProgressView
from corolla.platform.flower import ControlClient, RunResult
from corolla.platform.launch.federation import COORDINATOR, LocalFederation, local_consortium
from corolla.platform.launch.servers import LocalServers, even_spans
from corolla.training.config import TrainConfig

Echo = Callable[[str], None]


class TrainLaunchError(CorollaError):
    """The local consortium could not be set up, or the data for it is missing."""

    exit_code = 7


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FollowedRun:
    result: RunResult
    events: list[ProgressEvent]  # the ServerApp's progress events


def follow_run(
    control: ControlClient,
    config: TrainConfig,
    *,
    timeout: float,
    app: Path | None = None,
    echo: Echo = print,
    aliases: Mapping[str, str] | None = None,
    site_progress: Sequence[Path] = (),
    bars: bool | None = None,
    on_event: Callable[[ProgressEvent], None] | None = None,
) -> FollowedRun:
    """Submit a run of `app` (default: Corolla's) with `config`, show its progress as it comes
    (bars on a terminal, lines through `echo` otherwise: `federation.view`), and wait for the
    run; raises `RunFailed` unless it completes.

    `site_progress` are the sites' own progress files (a local consortium's stores), followed
    for their step events. `aliases` renames sites in the printed lines: the coordinator knows
    a site that never answered only as `node-<id>`, the local launcher knows which site that is."""
    progress_path = Path(config.out_dir) / PROGRESS_FILE
    for path in [progress_path, *site_progress]:
        with contextlib.suppress(OSError):
            path.unlink()  # a previous run's events must not be shown as this one's
    run_id = control.start_run(app or app_dir(), run_config=config.to_run_config())
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def wait() -> None:
        try:
            outcome["result"] = control.wait_for_run(run_id, timeout=timeout)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=wait, name=f"wait-run-{run_id}", daemon=True).start()
    events: list[ProgressEvent] = []
    view = ProgressView(lambda event: format_event(_aliased(event, aliases)), echo=echo, bars=bars)
    try:
        with view:
            for event in follow([progress_path, *site_progress], done=finished.is_set):
                if not isinstance(event, StepEvent):  # the coordinator's events (a site's are its own)
                    events.append(event)
                if on_event is not None:
                    on_event(event)
                view.show(event)
    except BaseException:  # Ctrl-C: do not leave the run going
        with contextlib.suppress(CorollaError):
            control.stop_run(run_id)
        raise
    if "error" in outcome:
        raise outcome["error"]
    result: RunResult = outcome["result"]
    if not events:  # the ServerApp's out_dir is not on this machine
        events = events_from_log(result.log)
        with ProgressView(lambda event: format_event(_aliased(event, aliases)), echo=echo, bars=False) as after:
            for event in events:
                after.show(event)
    result.raise_for_status()
    return FollowedRun(result=result, events=events)


def _aliased(event: ProgressEvent, aliases: Mapping[str, str] | None) -> ProgressEvent:
    if aliases and isinstance(event, RoundEvent):
        return event.model_copy(update={"sites": {aliases.get(name, name): info for name, info in event.sites.items()}})
    return event


def run_summary(config: TrainConfig, followed: FollowedRun) -> dict[str, Any]:
    """The coordinator's summary.json when it is on this machine, else what the events tell."""
    path = Path(config.out_dir) / "summary.json"
    done = next((e for e in reversed(followed.events) if isinstance(e, DoneEvent)), None)
    summary: dict[str, Any]
    if path.is_file():
        summary = json.loads(path.read_text(encoding="utf-8"))
    else:
        summary = {"rounds": [e.to_json() for e in followed.events if isinstance(e, RoundEvent)]}
    adapter = summary.get("adapter") or (done.adapter if done is not None else None)
    return {**summary, "adapter": adapter, "run_id": followed.result.run_id}


def run_timeout(config: TrainConfig) -> float:
    """A bound on a whole run: waiting for sites, every round's replies, evaluation, saving."""
    return config.round_timeout * (config.rounds + 1) + 600.0 * config.rounds + 600.0


def submit(
    config: TrainConfig,
    control: ControlClient,
    *,
    echo: Echo = print,
    on_event: Callable[[ProgressEvent], None] | None = None,
) -> dict[str, Any]:
    """`platform train --superlink`: run on an existing federation and follow it."""
    followed = follow_run(control, config, timeout=run_timeout(config), echo=echo, on_event=on_event)
    return run_summary(config, followed)


# --- data for a local run -------------------------------------------------------------------


def prepare_data(
    root: Path,
    *,
    sites: int,
    seed: int,
    given: Sequence[Path] = (),
    test: Path | None = None,
    records_per_site: int = 3000,
    test_records: int = 200,
) -> tuple[list[Path], Path]:
    """Each site's JSONL and the held-out JSONL: `given` (files, one per site, or one
    directory of `*.jsonl` with `test.jsonl`) or synthetic clinical notes written to `root`."""
    if len(given) == 1 and Path(given[0]).is_dir():
        directory = Path(given[0])
        test = test or directory / "test.jsonl"
        given = sorted(p for p in directory.glob("*.jsonl") if p.resolve() != Path(test).resolve())
        if not given:
            raise TrainLaunchError(f"--data {str(directory)!r}: no site *.jsonl files in it")
    if given:
        missing = [str(p) for p in [*given, *([test] if test else [])] if not Path(p).is_file()]
        if missing:
            raise TrainLaunchError(f"data file(s) not found: {', '.join(missing)}")
        if test is None:
            raise TrainLaunchError("give --test-data JSONL: the held-out records the coordinator scores")
        from corolla.training.data import load_jsonl

        for path in [*given, test]:  # a bad line is a clear error now, not a failed site later
            load_jsonl(path)
        return [Path(p).resolve() for p in given], Path(test).resolve()
    from corolla.training.clinical import synthetic_clinical
    from corolla.training.data import write_jsonl

    data = synthetic_clinical(sites=sites, records_per_site=records_per_site, test_records=test_records, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"site-{i}.jsonl" for i in range(sites)]
    for records, path in zip(data.sites, paths, strict=True):
        write_jsonl(records, path)
    write_jsonl(data.test, root / "test.jsonl")
    return [p.resolve() for p in paths], (root / "test.jsonl").resolve()


# --- the local consortium -------------------------------------------------------------------


class LocalConsortiumRun:
    """`platform train` with no `--superlink`: everything on this machine, under `root`
    (`consortium/` is made afresh; `models/`, reused, holds the tiny model)."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        root: Path,
        servers: int = 2,
        replicas: int = 1,
        site_data: Sequence[Path],
        test_data: Path,
        faults: Mapping[int, str] | None = None,
        keep_updates: bool = False,
        echo: Echo = print,
        status: Echo = _stderr,
    ) -> None:
        """`replicas` servers serve each span (servers // replicas spans); `faults` (tests and
        benchmarks only) maps a server's index to an `--inject-fault` spec."""
        if servers < 1 or not site_data:
            raise TrainLaunchError(f"a local consortium needs at least 1 server and 1 site (got {servers}, 0)")
        if replicas < 1 or servers % replicas:
            raise TrainLaunchError(f"--replicas {replicas} must divide --local-servers {servers}")
        self.config = config
        self.root = Path(root)
        self.servers = servers
        self.replicas = replicas
        self.faults = dict(faults or {})
        self.keep_updates = keep_updates  # each site keeps the updates it contributed (tests)
        self.site_data = [Path(p) for p in site_data]
        self.test_data = Path(test_data)
        self.echo = echo  # progress lines
        self.status = status  # what is being started
        self.on_event: Callable[[ProgressEvent], None] | None = None  # every progress event (metrics)

    def audit_note(self) -> str | None:
        """What to tell the user when spot checks are asked for but no span has a second server
        to re-run an audit on: every drawn audit stays unchecked and the rounds say `audits 0`."""
        if self.config.audit_rate > 0 and self.replicas < 2:
            return (
                f"spot checks: rate {self.config.audit_rate:g}, but each span has one server, so there is no replica "
                "to re-run an audit on: audits stay unchecked (for checks: --local-servers 3 --replicas 3)"
            )
        return None

    def run(self) -> dict[str, Any]:
        from corolla.inference.models.checkpoint import Checkpoint

        sites = len(self.site_data)
        blocks = Checkpoint.open(self.config.model).num_blocks
        with ExitStack() as stack:
            self.status(f"local consortium in {self.root}: throwaway CA, {self.servers} servers, {sites} sites")
            consortium = local_consortium(self.root / "consortium", servers=self.servers, sites=sites)
            logs = self.root / "logs"
            shutil.rmtree(logs, ignore_errors=True)
            stores = self.root / "stores"
            shutil.rmtree(stores, ignore_errors=True)  # the sites' ledgers belong to this consortium
            self.status(f"starting {self.servers} block servers on {self.config.model} ...")
            swarm = LocalServers(
                Path(self.config.model),
                [span for span in even_spans(blocks, self.servers // self.replicas) for _ in range(self.replicas)],
                torch_threads=1,
                workspace=consortium.workspace,
                nodes=consortium.servers,
                faults=self.faults,
            )
            stack.enter_context(swarm)
            if (note := self.audit_note()) is not None:
                self.status(note)
            node_configs: dict[str, dict[str, bool | int | float | str]] = {
                name: {
                    "data": str(data),
                    "store": str(stores / name),
                    "workspace": str(consortium.workspace),
                    "node": name,
                    "allow-plain-updates": not self.config.secure_agg,  # only when this run asks for it
                    "keep-updates": self.keep_updates,
                }
                for name, data in zip(consortium.sites, self.site_data, strict=True)
            }
            self.status(f"starting the SuperLink and {sites} SuperNodes (logs in {logs}) ...")
            federation = stack.enter_context(LocalFederation(consortium.workspace, node_configs, work_dir=logs))
            config = dataclasses.replace(
                self.config,
                out_dir=str(Path(self.config.out_dir).resolve()),
                model=str(Path(self.config.model).resolve()),
                test_data=str(self.test_data.resolve()),
                peers=tuple(swarm.initial_peers),
                workspace=str(consortium.workspace),
                node=COORDINATOR,
                sites=sites,
            )
            aliases = {f"node-{node.node_id}": name for name, node in federation.nodes.items()}
            followed = follow_run(
                federation.control,
                config,
                timeout=run_timeout(config),
                echo=self.echo,
                aliases=aliases,
                site_progress=[stores / name / PROGRESS_FILE for name in consortium.sites],
                on_event=self.on_event,
            )
            return run_summary(config, followed)
