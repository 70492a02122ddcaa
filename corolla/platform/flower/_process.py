"""One Flower executable run as a child process, its output in a log file.

Flower processes start helpers of their own: the SuperLink and every SuperNode start a
`flower-superexec`, which starts `flwr-serverapp`/`flwr-clientapp` per run or message. The
SuperLink starts its SuperExec in a new session (`start_new_session=True`), so killing our
child's process group would miss it; `stop()` therefore signals the whole process tree,
found through `/proc` before the parent goes (orphans are re-parented and lost to the walk).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from corolla.platform.flower.errors import FederationError, FederationTimeout, ProcessFailed

T = TypeVar("T")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLOWER_EXIT_CODE = re.compile(r"Exit Code: (\d+)")
_POLL = 0.1  # seconds between readiness checks


def flower_executable(name: str) -> str:
    """The path of a Flower console script, preferring the one installed beside this Python."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FederationError(f"`{name}` not found beside {sys.executable} nor on PATH; is flwr 1.42 installed?")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process we start: offline, quiet, isolated state."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)  # installed FABs, CLI config, telemetry id: one directory per process
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # otherwise events are posted to telemetry.flower.ai
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"  # otherwise a background thread asks PyPI for new releases
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file as they happen
    # Flower starts `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by bare name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def clean_log(text: str) -> str:
    """Flower's log lines without their colour codes."""
    return _ANSI.sub("", text)


class FlowerProcess:
    """A Flower executable writing stdout and stderr to `work_dir/<name>.log`."""

    def __init__(self, *, name: str, argv: Sequence[str], work_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.work_dir = Path(work_dir)
        self.log_path = self.work_dir / f"{name}.log"
        self.flwr_home = self.work_dir / f"{name}.flwr-home"
        self._popen: subprocess.Popen[bytes] | None = None
        self._tree: dict[int, str] = {}  # pid -> start time, every process seen in our tree

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def start(self) -> None:
        if self._popen is not None:
            raise FederationError(f"{self.name} was already started")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"$ {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=flower_env(self.flwr_home),
                cwd=self.work_dir,
            )

    def output(self) -> str:
        """Everything the process (and its helpers) logged so far, colour codes removed."""
        try:
            return clean_log(self.log_path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def flower_exit_code(self) -> int | None:
        codes = _FLOWER_EXIT_CODE.findall(self.output())
        return int(codes[-1]) if codes else None

    def failed(self, what: str) -> ProcessFailed:
        """The error for a process that `what` (e.g. 'exited before it was ready'), quoting its log."""
        code = self.flower_exit_code()
        flower = f", Flower exit code {code}" if code is not None else ""
        return ProcessFailed(
            f"{self.name} {what} (status {self.returncode}{flower}); last lines of {self.log_path}:\n{self.tail()}",
            name=self.name,
            log_path=self.log_path,
            flower_exit_code=code,
        )

    def wait_until(self, probe: Callable[[], T | None], *, timeout: float, what: str) -> T:
        """Poll `probe` until it returns a value; raise if the process exits or `timeout` passes.

        `probe` runs once more after an exit, so a result logged just before exiting counts.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._remember_tree()
            exited = not self.running
            result = probe()
            if result is not None:
                return result
            if exited:
                raise self.failed(f"exited before {what}")
            if time.monotonic() > deadline:
                raise FederationTimeout(
                    f"{self.name}: no {what} within {timeout:.0f} s; last lines of {self.log_path}:\n{self.tail()}"
                )
            time.sleep(_POLL)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its status."""
        if self._popen is None:
            raise FederationError(f"{self.name} was never started")
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FederationTimeout(f"{self.name} still running after {timeout:.0f} s") from None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process and its helpers, SIGKILL what is left after `grace` seconds."""
        if self._popen is None:
            return
        self._remember_tree()
        self._signal_tree(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._alive_in_tree() and time.monotonic() < deadline:
            self._remember_tree()  # helpers may still be spawning while the parent winds down
            time.sleep(_POLL)
        self._signal_tree(signal.SIGKILL)
        self._popen.wait()
        deadline = time.monotonic() + 5.0
        while self._alive_in_tree() and time.monotonic() < deadline:
            time.sleep(_POLL)

    def _remember_tree(self) -> None:
        if self._popen is None or self._popen.poll() is not None:
            return
        for pid in [self._popen.pid, *_descendants(self._popen.pid)]:
            started = _start_time(pid)
            if started is not None:
                self._tree.setdefault(pid, started)

    def _alive_in_tree(self) -> bool:
        return any(_is_same_live_process(pid, started) for pid, started in self._tree.items())

    def _signal_tree(self, sig: signal.Signals) -> None:
        for pid, started in self._tree.items():
            if _is_same_live_process(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields is not None else None  # field 22 of proc(5): starttime


def _is_same_live_process(pid: int, started: str) -> bool:
    """True if `pid` is still the process first seen at `started` (not a reused pid) and not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
