"""A Corolla swarm with one process per network namespace and WAN latency on the data plane.

`NamespaceSwarm` puts a bare DHT bootstrap peer, one `platform serve` per span and a
client each on a host of a `NetnsLab`. Every server's gRPC port sits behind a
`DelayProxy` in the server's own namespace, and the server announces the proxy's port
(`--announce-port`), so whatever a client sends to a server crosses the added round
trip. DHT traffic is not delayed: discovery is not what is being measured.

    with NetnsLab(prefix="corx") as lab, NamespaceSwarm(lab, model, [(0, 2), (2, 4)], rtt_ms=20,
                                                          consortium=consortium) as swarm:
        result = swarm.run_client("generate", "--prompts", "[[1, 2, 3]]", "--new-tokens", "8")
        swarm.set_rtt(50)  # same servers, proxies restarted with the new delay

The client is this module run as a script inside the client's namespace (it cannot be a
thread of the test: a process belongs to one namespace). It prints one JSON line:

    python -m tests.e2e.swarm_lab generate --model DIR --peer MULTIADDR --node site-0 --workspace WS \
        --expect-servers 3 --prompts '[[5, 6, 7]]' --new-tokens 16
    python -m tests.e2e.swarm_lab decode ... --prompt-tokens 16 --warmup-steps 5 --steps 40

In secure mode every process runs with its own node identity (`--workspace/--node`):
server-0..N-1 serve, server-N is the bootstrap peer, site-0 is the client.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.e2e.netns import DelayProxy, Host, NetnsError, NetnsLab, wait_for_line

if TYPE_CHECKING:  # the client imports corolla (and torch) only once it runs
    from corolla.platform.workspace import LocalConsortium

__all__ = ["ClientResult", "LabServer", "NamespaceSwarm"]

ROOT = Path(__file__).resolve().parents[2]

# Every host is a namespace of its own, so fixed ports never clash.
GRPC_PORT = 7000  # the server's real gRPC port
PROXY_PORT = 7001  # the delaying proxy in front of it: what the DHT record names
DHT_PORT = 7002  # libp2p, not delayed

_START_TIMEOUT_S = 120.0  # a server imports torch and measures its span; 2 cores shared by all
_CLIENT_TIMEOUT_S = 300.0
_DISCOVERY_TIMEOUT_S = 30.0  # client waits this long for every server's record to show
_LOG_TAIL_LINES = 25


@dataclass(eq=False)
class LabServer:
    """One `platform serve` process and the proxy in front of it."""

    host: Host
    span: tuple[int, int]
    node: str | None  # identity name; None in --insecure mode
    process: subprocess.Popen[str] | None = None
    proxy: DelayProxy | None = None
    endpoint: str = ""  # as announced (the proxy), from the READY line
    log: Path | None = None
    proxy_stats: list[dict[str, float] | None] = field(default_factory=list)  # one per stopped proxy

    @property
    def direct_endpoint(self) -> str:
        return f"{self.host.ip}:{GRPC_PORT}"

    @property
    def proxy_endpoint(self) -> str:
        return f"{self.host.ip}:{PROXY_PORT}"


@dataclass(frozen=True, slots=True)
class ClientResult:
    """The client's JSON line, and how long the client process took from start to exit."""

    data: dict[str, Any]
    wall_s: float


class NamespaceSwarm:
    """Bootstrap peer, servers behind delaying proxies, and a client host, on `lab`.

    `consortium` (a `LocalConsortium` with at least len(spans)+1 servers and one site)
    runs every process with mutual TLS; None runs everything `--insecure`.
    """

    def __init__(
        self,
        lab: NetnsLab,
        model: Path,
        spans: Sequence[tuple[int, int]],
        *,
        rtt_ms: float,
        consortium: LocalConsortium | None = None,
        torch_threads: int = 1,
        log_dir: Path | None = None,
    ) -> None:
        if not spans:
            raise ValueError("spans must name at least one server span")
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms!r}")
        if consortium is not None and (len(consortium.servers) < len(spans) + 1 or not consortium.sites):
            raise ValueError(
                f"consortium needs {len(spans) + 1} server identities (one per span and the bootstrap peer) and a "
                f"site; it has {len(consortium.servers)} servers and {len(consortium.sites)} sites"
            )
        self.lab = lab
        self.model = Path(model)
        self.spans = [(start, end) for start, end in spans]
        self.rtt_ms = rtt_ms
        self.consortium = consortium
        self.torch_threads = torch_threads
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.log_dir = log_dir
        self.bootstrap_host: Host | None = None
        self.bootstrap_process: subprocess.Popen[str] | None = None
        self.bootstrap_addr = ""
        self.servers: list[LabServer] = []
        self.client_host: Host | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> NamespaceSwarm:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="swarm-lab-")
            self.log_dir = Path(self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        boot = self.bootstrap_host = self.lab.add_host("boot")
        boot_node = self.consortium.servers[len(self.spans)] if self.consortium is not None else None
        self.bootstrap_process = self._spawn(
            boot,
            ["swarm", "bootstrap", "--host", boot.ip, "--dht-port", str(DHT_PORT), *self._identity(boot_node)],
            log=self.log_dir / "bootstrap.log",
        )
        # The other hosts and the proxies are made while the bootstrap peer imports.
        for index, span in enumerate(self.spans):
            node = self.consortium.servers[index] if self.consortium is not None else None
            self.servers.append(LabServer(host=self.lab.add_host(f"s{index}"), span=span, node=node))
        self.client_host = self.lab.add_host("client")
        for server in self.servers:
            server.proxy = self._proxy(server, self.rtt_ms)
        line = self._wait_ready(self.bootstrap_process, self.log_dir / "bootstrap.log")
        self.bootstrap_addr = line.split("=", 1)[1].strip()
        started = []
        for index, server in enumerate(self.servers):  # all at once: each spends seconds importing torch
            log = server.log = self.log_dir / f"server{index}.log"
            server.process = self._spawn(server.host, self._serve_args(server), log=log)
            started.append((server, server.process, log))
        for server, process, log in started:
            line = self._wait_ready(process, log)
            server.endpoint = dict(part.split("=", 1) for part in line.split()[1:])["endpoint"]

    def stop(self) -> None:
        """Stop the proxies (keeping their stats), then every process. The lab deletes the hosts."""
        for server in self.servers:
            self._stop_proxy(server)
        processes = [s.process for s in self.servers] + [self.bootstrap_process]
        for process in processes:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in processes:
            if process is not None:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NamespaceSwarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_rtt(self, rtt_ms: float) -> list[dict[str, float] | None]:
        """Restart every proxy with `rtt_ms` on the same port (the servers and their records
        stay); returns what each stopped proxy carried, in server order (`ProxyStats.summary`)."""
        for server in self.servers:
            self._stop_proxy(server)
        self.rtt_ms = rtt_ms
        for server in self.servers:
            server.proxy = self._proxy(server, rtt_ms)
        return [server.proxy_stats[-1] for server in self.servers]

    # -- the client --------------------------------------------------------------------------

    def run_client(self, command: str, *args: str, timeout: float = _CLIENT_TIMEOUT_S) -> ClientResult:
        """Run `python -m tests.e2e.swarm_lab COMMAND ...` on the client host; its JSON line, parsed."""
        if self.client_host is None:
            raise NetnsError("the swarm is not started")
        site = self.consortium.sites[0] if self.consortium is not None else None
        argv = [
            sys.executable, "-m", "tests.e2e.swarm_lab", command,
            "--model", str(self.model), "--peer", self.bootstrap_addr,
            "--expect-servers", str(len(self.servers)), *self._identity(site), *args,
        ]  # fmt: skip
        began = time.perf_counter()
        try:
            out = self.client_host.check_output(argv, timeout=timeout, cwd=ROOT, env=self._env())
        except (NetnsError, subprocess.TimeoutExpired) as error:
            raise NetnsError(f"client {command} failed: {error}\n{self.logs_tail()}") from None
        wall = time.perf_counter() - began
        lines = [line for line in out.splitlines() if line.strip()]
        if not lines:
            raise NetnsError(f"client {command} printed nothing\n{self.logs_tail()}")
        return ClientResult(data=json.loads(lines[-1]), wall_s=wall)

    def logs_tail(self) -> str:
        """The last lines of every server's and the bootstrap peer's stderr, for failure messages."""
        if self.log_dir is None:
            return ""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            with contextlib.suppress(OSError):
                tail = log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
                parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- helpers -----------------------------------------------------------------------------

    def _identity(self, node: str | None) -> list[str]:
        if self.consortium is None:
            return ["--insecure"]
        return ["--workspace", str(self.consortium.workspace), "--node", str(node)]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": str(self.torch_threads)}

    def _serve_args(self, server: LabServer) -> list[str]:
        ip = server.host.ip
        return [
            "serve", "--model", str(self.model), "--blocks", f"{server.span[0]}:{server.span[1]}",
            "--host", ip, "--port", str(GRPC_PORT), "--dht-port", str(DHT_PORT),
            "--announce-host", ip, "--announce-port", str(PROXY_PORT),
            "--peers", self.bootstrap_addr, *self._identity(server.node),
        ]  # fmt: skip

    def _spawn(self, host: Host, args: list[str], *, log: Path) -> subprocess.Popen[str]:
        with log.open("w") as stderr:  # the child keeps its own descriptor
            return host.run(
                [sys.executable, "-m", "corolla", *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=self._env(),
            )

    def _wait_ready(self, process: subprocess.Popen[str], log: Path) -> str:
        try:
            return wait_for_line(process, "READY", timeout=_START_TIMEOUT_S)
        except NetnsError as error:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:])
            raise NetnsError(f"{error}\n--- {log.name}\n{tail}") from None

    def _proxy(self, server: LabServer, rtt_ms: float) -> DelayProxy:
        ip = server.host.ip
        return DelayProxy(server.host, listen=(ip, PROXY_PORT), target=(ip, GRPC_PORT), rtt_ms=rtt_ms).start()

    @staticmethod
    def _stop_proxy(server: LabServer) -> None:
        if server.proxy is not None:
            server.proxy.stop()
            server.proxy_stats.append(server.proxy.stats)
            server.proxy = None


# --------------------------------------------------------------------------- the client, run in its namespace


def _open_model(args: argparse.Namespace) -> Any:
    """`RemoteModelForCausalLM` joined through `--peer`, once all `--expect-servers` records show."""
    from corolla.inference.client import RemoteModelForCausalLM
    from corolla.inference.security import TlsConfig
    from corolla.pki import NodeIdentity

    tls = None
    if not args.insecure:
        tls = TlsConfig.for_node(NodeIdentity.load(Path(args.workspace) / "nodes" / args.node))
    model = RemoteModelForCausalLM.from_pretrained(args.model, initial_peers=[args.peer], tls=tls)
    deadline = time.monotonic() + _DISCOVERY_TIMEOUT_S
    records = model.swarm.router.records(refresh=True)
    while len(records) < args.expect_servers and time.monotonic() < deadline:
        time.sleep(0.5)
        records = model.swarm.router.records(refresh=True)
    if len(records) < args.expect_servers:
        model.close()
        raise SystemExit(f"saw {len(records)} of {args.expect_servers} servers within {_DISCOVERY_TIMEOUT_S} s")
    return model


def _records(model: Any) -> list[dict[str, Any]]:
    return [
        {"endpoint": r.endpoint, "start": r.start, "end": r.end, "node_id": r.node_id,
         "step_ms_per_block": r.step_ms_per_block, "tls_fingerprint": r.tls_fingerprint}
        for r in sorted(model.swarm.router.records(), key=lambda r: (r.start, r.endpoint))
    ]  # fmt: skip


def _route(session: Any) -> list[dict[str, Any]]:
    return [{"endpoint": hop.endpoint, "start": hop.start, "end": hop.end} for hop in session.route]


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    """`model.generate` on each prompt (greedy, no EOS); tokens, wall time and route of each."""
    import torch

    torch.set_num_threads(1)
    with _open_model(args) as model:
        out: dict[str, Any] = {"records": _records(model), "rtt_ms_measured": {}, "generations": []}
        for prompt in json.loads(args.prompts):
            ids = torch.tensor([prompt] if isinstance(prompt[0], int) else prompt, dtype=torch.long)
            session = model.inference_session(max_length=ids.shape[1] + args.new_tokens, batch_size=ids.shape[0])
            began = time.perf_counter()
            tokens = model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=None, session=session)
            wall = time.perf_counter() - began
            out["generations"].append({"tokens": tokens.tolist(), "wall_s": wall, "route": _route(session)})
            session.close()
        out["rtt_ms_measured"] = {r["endpoint"]: model.swarm.rtt_ms(_record(model, r["endpoint"]))
                                  for r in out["records"]}  # fmt: skip
    return out


def _record(model: Any, endpoint: str) -> Any:
    return next(r for r in model.swarm.router.records() if r.endpoint == endpoint)


def _decode(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy decoding with the client loop (embed, `session.step` through every hop, head)
    timed per step; warm-up steps first, in the same session."""
    import torch

    torch.set_num_threads(1)
    with _open_model(args) as model, torch.inference_mode():
        parts = model.client_parts
        prompt = torch.randint(0, 400, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        total = args.warmup_steps + args.steps
        began = time.perf_counter()
        session = model.inference_session(max_length=args.prompt_tokens + 1 + total, batch_size=1)
        opened = time.perf_counter()
        try:
            hidden = session.step(parts.embed(prompt, 0))
            token = torch.argmax(parts.head(hidden[:, -1:])[:, -1].float(), dim=-1)
            prefilled = time.perf_counter()
            tokens, step_s = [int(token)], []
            for _ in range(total):
                t0 = time.perf_counter()
                hidden = session.step(parts.embed(token[:, None], session.position))
                token = torch.argmax(parts.head(hidden[:, -1:])[:, -1].float(), dim=-1)
                step_s.append(time.perf_counter() - t0)
                tokens.append(int(token))
            route = _route(session)
        finally:
            session.close()
        return {
            "records": _records(model),
            "rtt_ms_measured": {hop["endpoint"]: model.swarm.rtt_ms(_record(model, hop["endpoint"])) for hop in route},
            "route": route,
            "prompt": prompt[0].tolist(),
            "tokens": tokens,  # the prefill's token, then one per step
            "open_s": opened - began,
            "prefill_s": prefilled - opened,
            "warmup_step_s": step_s[: args.warmup_steps],
            "step_s": step_s[args.warmup_steps :],
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm_lab.py", description="the client of a NamespaceSwarm")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "decode"):
        sub = commands.add_parser(name)
        sub.add_argument("--model", required=True)
        sub.add_argument("--peer", required=True, help="the bootstrap peer's multiaddr")
        sub.add_argument("--expect-servers", type=int, default=1, help="wait until this many records show")
        sub.add_argument("--workspace")
        sub.add_argument("--node")
        sub.add_argument("--insecure", action="store_true")
    generate = commands.choices["generate"]
    generate.add_argument("--prompts", required=True, help="JSON list of prompts (each a list of ids, or a batch)")
    generate.add_argument("--new-tokens", type=int, default=16)
    decode = commands.choices["decode"]
    decode.add_argument("--prompt-tokens", type=int, default=16)
    decode.add_argument("--warmup-steps", type=int, default=5)
    decode.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    if not args.insecure and not (args.workspace and args.node):
        parser.error("give --workspace and --node, or --insecure")
    result = _generate(args) if args.command == "generate" else _decode(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
