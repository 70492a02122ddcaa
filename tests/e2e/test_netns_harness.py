"""The namespace lab and the delaying proxy do what the WAN tests rely on.

Two hosts on the lab bridge reach each other; the proxy adds the round-trip time it is
given (and little else); 5 MiB crosses it byte for byte; many connections share it;
and nothing the lab made outlives it, even after an exception or a SIGKILLed run.

The peers inside the namespaces are this module run as a script
(`python -m tests.e2e.test_netns_harness echo|pingpong|bulk|many ...`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.netns import DelayProxy, Host, NetnsLab, cleanup_stale, namespaces_available, wait_for_line

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "cort"  # apart from the default "cor", so these tests never touch a benchmark's lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


@pytest.fixture(scope="module", autouse=True)
def _need_namespaces() -> None:
    available, reason = namespaces_available()
    if not available:
        pytest.skip(reason)


def _peer(host: Host, *args: str, timeout: float = 30.0) -> str:
    return host.check_output([sys.executable, "-m", "tests.e2e.test_netns_harness", *args], cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Host, Host, int]]:
    """Host `a` runs an echo server; host `b` is the client. Yields (a, b, echo port)."""
    with NetnsLab(prefix=PREFIX) as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        echo = a.run(
            [sys.executable, "-m", "tests.e2e.test_netns_harness", "serve"], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        port = int(wait_for_line(echo, "READY", timeout=15).split("port=")[1])
        yield a, b, port


def _names_in_root() -> tuple[set[str], set[str]]:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return (
        {line.split()[0] for line in namespaces.splitlines() if line.strip()},
        {line.split(":")[1].strip() for line in links.splitlines()},
    )


def test_two_hosts_reach_each_other(lab: tuple[Host, Host, int]) -> None:
    a, b, port = lab
    assert a.ip != b.ip
    assert _peer(b, "echo", a.ip, str(port)).strip() == f"echo from {b.ip}"


def test_proxy_adds_the_requested_round_trip(lab: tuple[Host, Host, int]) -> None:
    a, b, port = lab
    with (
        DelayProxy(a, listen=(a.ip, 0), target=("127.0.0.1", port), rtt_ms=0) as fast,
        DelayProxy(a, listen=(a.ip, 0), target=("127.0.0.1", port), rtt_ms=40) as slow,
    ):
        assert fast.address is not None and slow.address is not None
        medians = json.loads(
            _peer(b, "pingpong", "30", f"{a.ip}:{port}", f"{a.ip}:{fast.address[1]}", f"{a.ip}:{slow.address[1]}")
        )
    direct, through_fast, through_slow = medians
    print(f"median RTT ms: direct {direct:.3f}, proxy rtt=0 {through_fast:.3f}, proxy rtt=40 {through_slow:.3f}")
    print(f"proxy rtt=40 stats: {slow.stats}")
    assert through_fast - direct < 5, "the proxy itself should add well under a few ms"
    assert 30 <= through_slow - through_fast <= 50
    assert slow.stats is not None and slow.stats["bytes"] == 2 * 33 * 64  # 30 rounds + 3 warm-up, each way


def test_proxy_preserves_bytes(lab: tuple[Host, Host, int]) -> None:
    a, b, port = lab
    with DelayProxy(a, listen=(a.ip, 0), target=("127.0.0.1", port), rtt_ms=20) as proxy:
        assert proxy.address is not None
        result = json.loads(_peer(b, "bulk", f"{a.ip}:{proxy.address[1]}", str(5 * 1024 * 1024)))
    assert result["received"] == result["sent"] == 5 * 1024 * 1024
    assert proxy.stats is not None and proxy.stats["bytes"] == 2 * 5 * 1024 * 1024
    assert result["received_sha256"] == result["sent_sha256"]


def test_proxy_carries_many_concurrent_connections(lab: tuple[Host, Host, int]) -> None:
    a, b, port = lab
    with DelayProxy(a, listen=(a.ip, 0), target=("127.0.0.1", port), rtt_ms=20) as proxy:
        assert proxy.address is not None
        started = time.monotonic()
        assert _peer(b, "many", f"{a.ip}:{proxy.address[1]}", "64").strip() == "64 ok"
    # Pipelined, not serialised: 64 connections × a few round trips each finish in about one second.
    assert time.monotonic() - started < 10


def test_cleanup_removes_everything_even_after_an_exception() -> None:
    namespaces_before, links_before = _names_in_root()
    with pytest.raises(KeyboardInterrupt), NetnsLab(prefix=PREFIX) as lab:
        host = lab.add_host("x")
        lab.add_host("y").shape(50)
        host.run(["sleep", "300"])  # a process still inside a namespace must not keep it alive
        made = set(lab.namespaces)
        assert made <= _names_in_root()[0]
        raise KeyboardInterrupt
    namespaces_after, links_after = _names_in_root()
    assert not made & namespaces_after
    assert not {n for n in namespaces_after - namespaces_before if n.startswith(PREFIX)}
    assert links_after == links_before, "the lab must not create links in the root namespace"


def test_cleanup_stale_removes_what_a_killed_run_left() -> None:
    code = (
        "from tests.e2e.netns import NetnsLab\n"
        f"lab = NetnsLab(prefix={PREFIX!r}).__enter__()\n"
        "lab.add_host('a')\n"
        "print('READY', ' '.join(lab.namespaces), flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        left = set(wait_for_line(child, "READY", timeout=15).split()[1:])
    finally:
        child.send_signal(signal.SIGKILL)  # no cleanup runs
        child.wait()
    assert left <= _names_in_root()[0]
    assert left <= set(cleanup_stale(PREFIX))
    assert not left & _names_in_root()[0]


# --------------------------------------------------------------------------- peers run inside namespaces


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def _open(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*_split(address))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _serve() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "0.0.0.0", 0, backlog=1024)  # all interfaces of a private namespace
    print(f"READY port={server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


async def _echo(address: str) -> str:
    reader, writer = await _open(address)
    me = writer.get_extra_info("sockname")[0]
    writer.write(f"echo from {me}\n".encode())
    line = (await reader.readline()).decode()
    writer.close()
    return line


async def _median_rtt_ms(address: str, rounds: int) -> float:
    reader, writer = await _open(address)
    samples = []
    for i in range(rounds + 3):  # three warm-up rounds
        started = time.perf_counter()
        writer.write(b"x" * 64)
        await reader.readexactly(64)
        if i >= 3:
            samples.append((time.perf_counter() - started) * 1e3)
    writer.close()
    return statistics.median(samples)


async def _bulk(address: str, size: int) -> dict[str, object]:
    reader, writer = await _open(address)
    payload = os.urandom(size)
    received = hashlib.sha256()
    count = 0

    async def send() -> None:
        for offset in range(0, size, 64 * 1024):
            writer.write(payload[offset : offset + 64 * 1024])
            await writer.drain()
        writer.write_eof()

    async def receive() -> None:
        nonlocal count
        while data := await reader.read(256 * 1024):
            received.update(data)
            count += len(data)

    await asyncio.wait_for(asyncio.gather(send(), receive()), timeout=30)
    writer.close()
    return {
        "sent": size,
        "received": count,
        "sent_sha256": hashlib.sha256(payload).hexdigest(),
        "received_sha256": received.hexdigest(),
    }


async def _many(address: str, connections: int) -> str:
    async def one(i: int) -> bool:
        reader, writer = await _open(address)
        ok = True
        for j in range(3):
            message = f"{i}:{j}\n".encode()
            writer.write(message)
            ok &= await reader.readline() == message
        writer.close()
        return ok

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(connections))), timeout=30)
    return f"{sum(results)} ok"


def _main(argv: list[str]) -> None:
    command, *args = argv
    if command == "serve":
        asyncio.run(_serve())
    elif command == "echo":
        print(asyncio.run(_echo(f"{args[0]}:{args[1]}")), end="")
    elif command == "pingpong":
        rounds, *addresses = args
        print(json.dumps([asyncio.run(_median_rtt_ms(a, int(rounds))) for a in addresses]))
    elif command == "bulk":
        print(json.dumps(asyncio.run(_bulk(args[0], int(args[1])))))
    elif command == "many":
        print(asyncio.run(_many(args[0], int(args[1]))))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
