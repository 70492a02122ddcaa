"""Network namespaces on a private bridge, and a TCP proxy that adds latency.

`NetnsLab` puts each process of a test on its own "host": a network namespace joined
to one bridge by a veth pair. The bridge lives in a namespace of its own, so the root
namespace's interfaces and routes are never touched; deleting the lab's namespaces
removes every link it made. `DelayProxy` adds round-trip time in user space, because
this kernel has no `netem`: each chunk is forwarded `rtt/2` after it arrived, in each
direction, pipelined (a chunk never waits for the one before it to be delivered).

    with NetnsLab() as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        server = a.run([sys.executable, "-m", "http.server", "8000", "--bind", a.ip])
        with DelayProxy(a, listen=(a.ip, 9000), target=(a.ip, 8000), rtt_ms=50) as proxy:
            b.check_output(["curl", f"http://{a.ip}:9000/"])  # one round trip costs 50 ms more
        print(proxy.stats)  # bytes carried and how late chunks left (timer lateness under load)

The proxy is also a command, so it can be started by hand in any namespace:

    python tests/e2e/netns.py proxy --listen 10.77.0.1:9000 --target 10.77.0.1:8000 --rtt-ms 50
    python tests/e2e/netns.py cleanup --prefix cor   # namespaces left by a killed run

Needs root and iproute2. Nothing here depends on pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = [
    "DelayProxy",
    "Host",
    "NetnsError",
    "NetnsLab",
    "ProxyStats",
    "cleanup_stale",
    "namespaces_available",
    "serve_delay_proxy",
    "wait_for_line",
]

_SCRIPT = Path(__file__).resolve()
_SEQUENCE = itertools.count()  # several labs in one process get distinct names
_TERMINATE_GRACE_S = 3.0


class NetnsError(RuntimeError):
    """An `ip`/`tc` command failed, or a process did not become ready."""


def _run(argv: Sequence[str], *, timeout: float = 15.0) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def _list_namespaces() -> list[str]:
    # `ip netns list` prints "name" or "name (id: N)".
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def _kill_namespace(namespace: str) -> None:
    """SIGKILL whatever still runs inside `namespace`, then delete it (its veth ends go with it)."""
    with contextlib.suppress(NetnsError, subprocess.TimeoutExpired):
        for pid in _run(["ip", "netns", "pids", namespace]).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    # A namespace still held by a dying process keeps its links; wait for it to go.
    for _ in range(50):
        with contextlib.suppress(NetnsError, subprocess.TimeoutExpired):
            if not _run(["ip", "netns", "pids", namespace]).split():
                break
        time.sleep(0.05)
    with contextlib.suppress(NetnsError, subprocess.TimeoutExpired):
        _run(["ip", "netns", "delete", namespace])


def _name_pattern(prefix: str) -> re.Pattern[str]:
    # Every namespace a lab makes is "<prefix>-<pid>-<seq>-<role>".
    return re.compile(rf"^{re.escape(prefix)}-(\d+)-(\d+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = "cor") -> list[str]:
    """Delete namespaces left by labs whose process is gone (a SIGKILLed run); returns their names."""
    pattern = _name_pattern(prefix)
    stale = [
        name
        for name in _list_namespaces()
        if (match := pattern.match(name)) and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1)))
    ]
    for name in stale:
        _kill_namespace(name)
    return stale


_availability: tuple[bool, str] | None = None


def namespaces_available() -> tuple[bool, str]:
    """Whether this machine lets us make namespaces, veths and a bridge; if not, why not."""
    global _availability
    if _availability is not None:
        return _availability
    if os.geteuid() != 0:
        _availability = (False, "network namespaces need root")
    elif shutil.which("ip") is None:
        _availability = (False, "iproute2 `ip` is not installed")
    else:
        namespace = f"corprobe-{os.getpid()}"
        try:
            _run(["ip", "netns", "add", namespace])
            try:
                _run(["ip", "-n", namespace, "link", "add", "br0", "type", "bridge"])
                _run(["ip", "-n", namespace, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
                _run(["ip", "-n", namespace, "link", "set", "v0", "master", "br0"])
            finally:
                _kill_namespace(namespace)
            _availability = (True, "")
        except (NetnsError, OSError, subprocess.TimeoutExpired) as error:
            _availability = (False, f"cannot create a namespace with a bridge and a veth: {error}")
    return _availability


def wait_for_line(process: subprocess.Popen[str], prefix: str = "READY", timeout: float = 30.0) -> str:
    """Return the first stdout line of `process` starting with `prefix`.

    A daemon thread keeps draining stdout afterwards, so a chatty child never blocks on
    a full pipe. `process` must have been started with `stdout=PIPE, text=True`.
    """
    stdout = process.stdout
    if stdout is None:
        raise NetnsError("wait_for_line needs a process started with stdout=subprocess.PIPE")
    found: collections.deque[str] = collections.deque(maxlen=1)
    seen: collections.deque[str] = collections.deque(maxlen=20)
    ready = threading.Event()

    def drain() -> None:
        for line in stdout:  # ends at EOF, when the process exits
            if not ready.is_set():
                seen.append(line.rstrip("\n"))
                if line.startswith(prefix):
                    found.append(line.rstrip("\n"))
                    ready.set()
        ready.set()

    threading.Thread(target=drain, name=f"drain-{process.pid}", daemon=True).start()
    if not ready.wait(timeout):
        raise NetnsError(f"pid {process.pid} printed no {prefix!r} line within {timeout} s; stdout: {list(seen)}")
    if not found:
        code = process.wait(timeout=5)
        raise NetnsError(f"pid {process.pid} exited {code} before printing {prefix!r}; stdout: {list(seen)}")
    return found[0]


@dataclass(eq=False)
class Host:
    """One namespace on the lab's bridge: `ip` on interface `eth0`, `lo` up."""

    name: str  # the caller's short name, e.g. "server1"
    namespace: str  # the kernel namespace name, unique per run
    ip: str
    port_on_bridge: str  # this host's veth end inside the switch namespace
    _lab: NetnsLab = field(repr=False)

    interface = "eth0"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside this namespace (for callers that spawn processes themselves)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` in this namespace; the lab terminates it on exit if it is still running."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        process: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **popen_kwargs)
        self._lab._processes.append(process)
        return process

    def check_output(self, argv: Sequence[str], *, timeout: float = 60.0, **run_kwargs: Any) -> str:
        """Run `argv` in this namespace to completion and return its stdout (text)."""
        result = subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False, **run_kwargs
        )
        if result.returncode != 0:
            raise NetnsError(f"{argv!r} in {self.namespace} exited {result.returncode}: {result.stderr.strip()}")
        return str(result.stdout)

    def shape(self, rate_mbit: float, *, burst_ms: float = 10.0, queue_ms: float = 100.0) -> None:
        """Limit this host's link to `rate_mbit` each way with `tbf` (egress here and on its bridge port)."""
        if not rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0, got {rate_mbit!r}")
        burst = max(int(rate_mbit * 1e6 / 8 * burst_ms / 1e3), 16 * 1024)  # bytes; at least a few MTUs
        tbf = ["root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{queue_ms}ms"]
        _run(["tc", "-n", self.namespace, "qdisc", "replace", "dev", self.interface, *tbf])
        _run(["tc", "-n", self._lab.switch, "qdisc", "replace", "dev", self.port_on_bridge, *tbf])


class NetnsLab:
    """A bridge in its own namespace and hosts attached to it; everything is deleted on exit.

    Namespaces are named `<prefix>-<pid>-<seq>-<role>` so parallel runs never clash and a
    later run can recognise (and delete) what a killed one left behind.
    """

    def __init__(self, prefix: str = "cor", subnet: str = "10.77.0.0/24") -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError(f"prefix must be 1-8 lowercase letters/digits starting with a letter, got {prefix!r}")
        self.prefix = prefix
        self.network = ipaddress.ip_network(subnet)
        if not self.network.is_private:
            raise ValueError(f"subnet must be private (it exists only inside the lab), got {subnet!r}")
        self.run_id = f"{prefix}-{os.getpid()}-{next(_SEQUENCE)}"
        self.switch = f"{self.run_id}-sw"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []  # every namespace this lab made, in creation order
        self._addresses = self.network.hosts()
        self._processes: list[subprocess.Popen[Any]] = []
        self._previous_sigterm: Any = None
        self._closed = False

    def __enter__(self) -> NetnsLab:
        try:
            cleanup_stale(self.prefix)
            self._add_namespace(self.switch)
            _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)
        self._install_sigterm_handler()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        """A new namespace with `lo` up and `eth0` on the bridge, holding the next free address."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", name):
            raise ValueError(f"host name must be 1-16 lowercase letters/digits starting with a letter, got {name!r}")
        if name in self.hosts or name == "sw":
            raise ValueError(f"host name {name!r} is already taken in this lab")
        try:
            address = next(self._addresses)
        except StopIteration:
            raise NetnsError(f"subnet {self.network} has no address left for host {name!r}") from None
        namespace = f"{self.run_id}-{name}"
        port = f"p{len(self.hosts)}"  # interface names are per namespace, so short ones never clash
        self._add_namespace(namespace)
        # Made inside the host namespace with its peer sent straight to the switch: the root
        # namespace never sees either end.
        _run(["ip", "-n", namespace, "link", "add", Host.interface, "type", "veth", "peer", "name", port,
              "netns", self.switch])  # fmt: skip
        _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
        _run(["ip", "-n", namespace, "addr", "add", f"{address}/{self.network.prefixlen}", "dev", Host.interface])
        _run(["ip", "-n", namespace, "link", "set", Host.interface, "up"])
        _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        host = Host(name=name, namespace=namespace, ip=str(address), port_on_bridge=port, _lab=self)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Stop every process started through the lab, then delete its namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._restore_sigterm_handler()
        running = [p for p in self._processes if p.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + _TERMINATE_GRACE_S
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for namespace in reversed(self.namespaces):
            _kill_namespace(namespace)  # also catches grandchildren the processes left behind
        self.namespaces.clear()

    def _add_namespace(self, namespace: str) -> None:
        _run(["ip", "netns", "add", namespace])
        self.namespaces.append(namespace)

    def _install_sigterm_handler(self) -> None:
        # SIGTERM would otherwise end the process without running `close`.
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


# --------------------------------------------------------------------------- the delaying proxy

_READ_SIZE = 256 * 1024
_IN_FLIGHT_LIMIT = 64 * 1024 * 1024  # bytes held per direction before the proxy stops reading
_LATE_BIN_MS = 0.05  # lateness histogram resolution
_LATE_BINS = 4000  # up to 200 ms; anything later lands in the last bin


class ProxyStats:
    """What the proxy carried, and how late chunks left compared with arrival + delay."""

    def __init__(self) -> None:
        self.connections = 0
        self.chunks = 0
        self.bytes = 0
        self.late_max_ms = 0.0
        self._late_histogram = [0] * _LATE_BINS

    def record(self, size: int, late_s: float) -> None:
        late_ms = max(0.0, late_s * 1e3)
        self.chunks += 1
        self.bytes += size
        self.late_max_ms = max(self.late_max_ms, late_ms)
        self._late_histogram[min(int(late_ms / _LATE_BIN_MS), _LATE_BINS - 1)] += 1

    def late_quantile_ms(self, q: float) -> float:
        """Upper edge of the histogram bin holding quantile `q` of chunk lateness (0 if nothing was sent)."""
        rank, seen = q * self.chunks, 0
        for index, count in enumerate(self._late_histogram):
            seen += count
            if count and seen >= rank:
                return min((index + 1) * _LATE_BIN_MS, self.late_max_ms)
        return 0.0

    def summary(self) -> dict[str, float]:
        return {
            "connections": self.connections,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "late_ms_p50": round(self.late_quantile_ms(0.5), 3),
            "late_ms_p99": round(self.late_quantile_ms(0.99), 3),
            "late_ms_max": round(self.late_max_ms, 3),
        }


class _DelayLine:
    """FIFO of (due time, chunk); arrival order and a constant delay keep due times sorted."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._items: collections.deque[tuple[float, bytes]] = collections.deque()
        self._bytes = 0
        self._changed = asyncio.Condition()

    async def put(self, chunk: bytes) -> None:
        """Queue `chunk` (b"" marks end of stream), due `delay_s` after now."""
        due = asyncio.get_running_loop().time() + self.delay_s
        async with self._changed:
            await self._changed.wait_for(lambda: self._bytes < _IN_FLIGHT_LIMIT)
            self._items.append((due, chunk))
            self._bytes += len(chunk)
            self._changed.notify_all()

    async def get(self) -> tuple[float, bytes]:
        """The next (due time, chunk), once it is due."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items))
            due, chunk = self._items.popleft()
        wait = due - asyncio.get_running_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
        return due, chunk

    async def release(self, size: int) -> None:
        async with self._changed:
            self._bytes -= size
            self._changed.notify_all()


async def _read_into(reader: asyncio.StreamReader, line: _DelayLine) -> None:
    while chunk := await reader.read(_READ_SIZE):
        await line.put(chunk)
    await line.put(b"")


async def _write_from(line: _DelayLine, writer: asyncio.StreamWriter, stats: ProxyStats) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due, chunk = await line.get()
        if not chunk:
            break
        stats.record(len(chunk), loop.time() - due)
        writer.write(chunk)
        await writer.drain()
        await line.release(len(chunk))
    if writer.can_write_eof():
        writer.write_eof()  # pass the half-close on, delayed like the data before it


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the proxy must not add Nagle delay


async def _close(writer: asyncio.StreamWriter, *, abort: bool) -> None:
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


async def _proxy_connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay_s: float,
    stats: ProxyStats,
) -> None:
    """Pump both directions through delay lines until both have ended; a reset on one side resets the other."""
    # The connection handshake itself is not delayed: only data (and FIN) is.
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
    except OSError:
        await _close(client_writer, abort=True)
        return
    stats.connections += 1
    _nodelay(client_writer)
    _nodelay(upstream_writer)
    failed = False
    try:
        async with asyncio.TaskGroup() as tasks:
            for reader, writer in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
                line = _DelayLine(delay_s)
                tasks.create_task(_read_into(reader, line))
                tasks.create_task(_write_from(line, writer, stats))
    except* (OSError, asyncio.IncompleteReadError):
        failed = True
    finally:
        await _close(client_writer, abort=failed)
        await _close(upstream_writer, abort=failed)


async def serve_delay_proxy(
    listen: tuple[str, int], target: tuple[str, int], rtt_ms: float, *, stats: ProxyStats | None = None
) -> None:
    """Forward every connection to `listen` on to `target`, adding `rtt_ms / 2` each way; runs until cancelled.

    Prints `READY listen=HOST:PORT ...` once listening (port 0 is replaced by the real one).
    """
    if rtt_ms < 0:
        raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms!r}")
    delay_s = rtt_ms / 2 / 1e3
    stats = stats if stats is not None else ProxyStats()
    connections: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()  # asyncio runs each connection callback as a task
        tracked = {task} if task is not None else set()
        connections.update(tracked)
        try:
            await _proxy_connection(reader, writer, target, delay_s, stats)
        except asyncio.CancelledError:
            pass  # shutdown; Python 3.11's start_server would log a cancelled callback task as an error
        finally:
            connections.difference_update(tracked)

    server = await asyncio.start_server(on_connect, *listen, backlog=1024, reuse_address=True)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"READY listen={host}:{port} target={target[0]}:{target[1]} rtt_ms={rtt_ms:g}", flush=True)
    try:
        await asyncio.Future()  # until cancelled
    finally:
        server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


class DelayProxy:
    """`serve_delay_proxy` as a process inside `host` (or in this namespace when `host` is None).

    `listen` port 0 picks a free port; `address` holds the real one once started. The
    process runs at `nice` (root may raise priority) so that busy model servers on the
    same cores delay its timers less; `stats` after `stop` says how late chunks really left.
    """

    def __init__(
        self, host: Host | None, *, listen: tuple[str, int], target: tuple[str, int], rtt_ms: float, nice: int = -10
    ) -> None:
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms!r}")
        self.host = host
        self.listen = listen
        self.target = target
        self.rtt_ms = rtt_ms
        self.nice = nice
        self.address: tuple[str, int] | None = None
        self.process: subprocess.Popen[str] | None = None
        self.stats: dict[str, float] | None = None  # ProxyStats.summary(), once stopped
        self._stats_dir: tempfile.TemporaryDirectory[str] | None = None

    def argv(self, stats_file: Path | None = None) -> list[str]:
        argv = [
            sys.executable, str(_SCRIPT), "proxy",
            "--listen", f"{self.listen[0]}:{self.listen[1]}",
            "--target", f"{self.target[0]}:{self.target[1]}",
            "--rtt-ms", f"{self.rtt_ms:g}",
            "--nice", str(self.nice),
        ]  # fmt: skip
        return argv if stats_file is None else [*argv, "--stats-file", str(stats_file)]

    def start(self, timeout: float = 15.0) -> DelayProxy:
        self._stats_dir = tempfile.TemporaryDirectory(prefix="delay-proxy-")
        argv = self.argv(Path(self._stats_dir.name) / "stats.json")
        kwargs: dict[str, Any] = {"stdout": subprocess.PIPE, "text": True}
        if self.host is not None:
            self.process = self.host.run(argv, **kwargs)
        else:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        try:
            line = wait_for_line(self.process, "READY", timeout)
        except BaseException:
            self.stop()
            raise
        self.address = _parse_address(line.split()[1].removeprefix("listen="))
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=_TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._stats_dir is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stats = json.loads((Path(self._stats_dir.name) / "stats.json").read_text())
            self._stats_dir.cleanup()
            self._stats_dir = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _proxy_main(args: argparse.Namespace) -> int:
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as error:  # raising priority needs root; run anyway, just less punctual
            print(f"netns.py proxy: cannot set nice {args.nice}: {error}", file=sys.stderr)
    stats = ProxyStats()

    async def main() -> None:
        serving = asyncio.ensure_future(serve_delay_proxy(args.listen, args.target, args.rtt_ms, stats=stats))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, serving.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serving

    asyncio.run(main())
    if args.stats_file is not None:
        args.stats_file.write_text(json.dumps(stats.summary()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netns.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    proxy = commands.add_parser("proxy", help="a TCP proxy adding a fixed round-trip time; prints READY")
    proxy.add_argument("--listen", type=_parse_address, required=True, metavar="HOST:PORT")
    proxy.add_argument("--target", type=_parse_address, required=True, metavar="HOST:PORT")
    proxy.add_argument("--rtt-ms", type=float, required=True, help="added round-trip time; half each way")
    proxy.add_argument("--nice", type=int, default=0, help="process niceness; negative needs root")
    proxy.add_argument("--stats-file", type=Path, help="write a JSON summary here on exit")
    cleanup = commands.add_parser("cleanup", help="delete namespaces left by killed runs")
    cleanup.add_argument("--prefix", default="cor")
    args = parser.parse_args(argv)
    if args.command == "proxy":
        return _proxy_main(args)
    for name in cleanup_stale(args.prefix):
        print(f"deleted {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
