"""A swarm of real `platform serve` processes on this machine.

Used by `platform generate` with no `--peers` (the embedded default), by the local
consortium of `platform train`, by end-to-end tests and by the benchmarks. The first
server is the DHT bootstrap peer; the others join through it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from corolla.inference.errors import InferenceError

_STOP_TIMEOUT_S = 5.0
"""`stop` kills a server still running this long after SIGTERM (it exits within ~2 s:
`platform serve` closes its sessions and leaves the DHT without waiting on it)."""


class LaunchError(InferenceError):
    """A local server process failed to start."""

    exit_code = 7


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    blocks: tuple[int, int]
    endpoint: str = ""
    dht_addr: str = ""
    device: str = ""  # where it computes, from its READY line ("cpu", "cuda:0")
    output: list[str] = field(default_factory=list)  # stderr lines, for error messages
    ready: threading.Event = field(default_factory=threading.Event)


def even_spans(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    """`servers` contiguous spans covering `num_blocks` as evenly as possible."""
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(servers)]


class LocalServers:
    def __init__(
        self,
        model: Path,
        spans: Sequence[tuple[int, int]],
        *,
        extra_args: Sequence[str] = (),
        per_server_args: Sequence[Sequence[str]] | None = None,
        torch_threads: int | None = None,
        start_timeout: float = 120.0,
        bootstrap: str | None = None,
        workspace: Path | None = None,
        nodes: Sequence[str] | None = None,
        faults: Mapping[int, str] | None = None,
    ) -> None:
        """`workspace` and `nodes` (one node name of role server per span) make every
        server run with its certificate; without them the servers run `--insecure`.
        `faults` (tests and benchmarks only) maps a server's index to an `--inject-fault`
        spec such as "noise:0.01": that server corrupts a fraction of its outputs."""
        self.model = Path(model)
        self.spans = list(spans)
        self.extra_args = list(extra_args)
        self.per_server_args = [list(a) for a in per_server_args] if per_server_args else [[] for _ in spans]
        for index, spec in (faults or {}).items():
            if not 0 <= index < len(self.spans):
                raise LaunchError(f"faults: server index {index} is not one of the {len(self.spans)} servers")
            self.per_server_args[index] += ["--inject-fault", spec]
        self.torch_threads = torch_threads
        self.start_timeout = start_timeout
        self.bootstrap = bootstrap  # an existing DHT peer to join; None = the first server is one
        if (workspace is None) != (nodes is None) or (nodes is not None and len(nodes) < len(self.spans)):
            raise LaunchError("give both workspace and one node name per span, or neither")
        self.workspace = workspace
        self.nodes = list(nodes) if nodes is not None else None
        self.servers: list[ServerProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        if self.bootstrap is not None:
            return [self.bootstrap]
        return [self.servers[0].dht_addr] if self.servers else []

    @property
    def endpoints(self) -> list[str]:
        return [s.endpoint for s in self.servers]

    def start(self) -> LocalServers:
        """Start the first server (the bootstrap peer), then the others all at once."""
        try:
            if self.bootstrap is None and self.spans:
                first = self._spawn(self.spans[0], self.per_server_args[0], index=0)
                self.servers.append(first)
                self._wait_ready(first)
                rest = list(range(1, len(self.spans)))
            else:
                rest = list(range(len(self.spans)))
            spawned = [
                self._spawn(self.spans[i], ["--peers", self._bootstrap_addr(), *self.per_server_args[i]], index=i)
                for i in rest
            ]
            self.servers.extend(spawned)
            for server in spawned:
                self._wait_ready(server)
        except BaseException:
            self.stop()
            raise
        return self

    def _bootstrap_addr(self) -> str:
        return self.bootstrap or self.servers[0].dht_addr

    def _spawn(self, span: tuple[int, int], extra: Sequence[str], *, index: int) -> ServerProcess:
        if self.workspace is not None and self.nodes is not None and index < len(self.nodes):
            security = ["--workspace", str(self.workspace), "--node", self.nodes[index]]
        else:
            security = ["--insecure"]
        cmd = [
            sys.executable,
            "-m",
            "corolla",
            "serve",
            "--model",
            str(self.model),
            "--blocks",
            f"{span[0]}:{span[1]}",
            *security,
            *self.extra_args,
            *extra,
        ]
        env = dict(os.environ)
        if self.torch_threads is not None:
            env["OMP_NUM_THREADS"] = str(self.torch_threads)
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        server = ServerProcess(process=process, blocks=span)
        threading.Thread(target=_drain, args=(process.stderr, server.output), daemon=True).start()

        def read_stdout() -> None:
            for line in process.stdout:  # type: ignore[union-attr]
                if line.startswith("READY "):
                    fields = dict(part.split("=", 1) for part in line.split()[1:])
                    server.endpoint, server.dht_addr = fields["endpoint"], fields["dht"]
                    server.device = fields.get("device", "")
                    server.ready.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        return server

    def _wait_ready(self, server: ServerProcess) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not server.ready.wait(0.1):
            if server.process.poll() is not None or time.monotonic() > deadline:
                server.process.kill()
                tail = "".join(server.output[-15:])
                raise LaunchError(f"server for blocks {server.blocks[0]}:{server.blocks[1]} did not start:\n{tail}")

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        self.servers[index].process.send_signal(sig)
        self.servers[index].process.wait(timeout=30)

    def stop(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                server.process.terminate()
        for server in self.servers:
            try:
                server.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()

    def __enter__(self) -> LocalServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _drain(stream: object, sink: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.append(line)
        del sink[:-200]
