"""The SuperLink's Control API, driven through the `flwr` CLI: enrol SuperNodes, run apps.

The CLI is Flower's documented client of the Control API (HTTPS, verified against the
connection's root certificates). Each `ControlClient` gets its own Flower home with a
single connection, `corolla`, so nothing is read from or written to `~/.flwr`, and
every call is logged to `work_dir/flwr-cli.log`.

A run is submitted from a local app directory (a `pyproject.toml` with
`[tool.flwr.app.components]`): the CLI builds the FAB (a zip of the directory) and sends
it to the SuperLink, which ships it to the SuperNodes; nothing is fetched from the
Flower hub and no dependencies are installed (the app's imports must already be
installed where the ServerApp and ClientApps run).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corolla.platform.flower._process import clean_log, flower_env, flower_executable
from corolla.platform.flower._user_config import UserConfigValue, format_user_config
from corolla.platform.flower.config import SuperLinkConnection
from corolla.platform.flower.errors import ControlError, FederationError, FederationTimeout, RunFailed

_CONNECTION = "corolla"  # the one connection in this client's Flower config


class RunStatus(StrEnum):
    """How a finished run ended (Flower's `finished:<sub-status>`)."""

    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


class SuperNodeStatus(StrEnum):
    """A SuperNode as the SuperLink lists it."""

    REGISTERED = "registered"  # key enrolled, node never connected
    ONLINE = "online"  # activated and sending heartbeats
    OFFLINE = "offline"  # was online, heartbeats stopped
    UNREGISTERED = "unregistered"  # key removed; the node can no longer take part


@dataclass(frozen=True, kw_only=True, slots=True)
class SuperNodeInfo:
    node_id: int
    status: SuperNodeStatus


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    run_id: int
    status: RunStatus
    details: str  # Flower's status details, e.g. why a run failed; "N/A" if none
    elapsed: float  # seconds the run took, as the SuperLink measures it
    log: str  # the run's log as `flwr log` streams it (the ServerApp's output)

    def raise_for_status(self) -> None:
        """Raise `RunFailed` unless the run completed."""
        if self.status is not RunStatus.COMPLETED:
            tail = "\n".join(self.log.splitlines()[-25:])
            raise RunFailed(f"run {self.run_id} finished {self.status.value}: {self.details}; end of its log:\n{tail}")


# --- what the `flwr ... --format json` commands print (checked, as anything from outside) ---


class _Reply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    success: bool
    error_message: str | None = Field(default=None, alias="error-message")


class _Ack(_Reply):
    pass


class _Registered(_Reply):
    node_id: int = Field(alias="node-id")


class _NodeRow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    node_id: int = Field(alias="node-id")
    status: SuperNodeStatus


class _Nodes(_Reply):
    nodes: list[_NodeRow]


class _Started(_Reply):
    run_id: int = Field(alias="run-id")  # printed as a string of digits


class _RunRow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    status: str  # "<status>" or "finished:<sub-status>"
    status_details: str = Field(default="", alias="status-details")
    elapsed: float = 0.0


class _Runs(_Reply):
    runs: list[_RunRow] = Field(min_length=1)


ReplyT = TypeVar("ReplyT", bound=_Reply)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Call:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


class ControlClient:
    """Control API calls to one SuperLink; CLI state and logs go in `work_dir`."""

    def __init__(self, connection: SuperLinkConnection, *, work_dir: Path, timeout: float = 60.0) -> None:
        if not timeout > 0:
            raise FederationError(f"ControlClient timeout = {timeout!r}: must be a positive number of seconds")
        self.connection = connection
        self.timeout = timeout  # seconds for each CLI call (not for a run)
        self.work_dir = Path(work_dir)
        self._home = self.work_dir / "flwr-cli.flwr-home"
        self._log_path = self.work_dir / "flwr-cli.log"
        self._home.mkdir(parents=True, exist_ok=True)
        (self._home / "config.toml").write_text(_flower_config(connection), encoding="utf-8")

    def register_supernode(self, public_key: Path) -> int:
        """Enrol a SuperNode's OpenSSH public key; its node id."""
        if not Path(public_key).is_file():
            raise ControlError(f"public key {str(public_key)!r}: no such file")
        return self._json(["supernode", "register", str(Path(public_key).resolve()), _CONNECTION], _Registered).node_id

    def unregister_supernode(self, node_id: int) -> None:
        """Remove an enrolled SuperNode; it can no longer take part."""
        self._json(["supernode", "unregister", str(node_id), _CONNECTION], _Ack)

    def list_supernodes(self) -> list[SuperNodeInfo]:
        nodes = self._json(["supernode", "list", _CONNECTION], _Nodes).nodes
        return [SuperNodeInfo(node_id=node.node_id, status=node.status) for node in nodes]

    def start_run(self, app_dir: Path, *, run_config: Mapping[str, UserConfigValue] | None = None) -> int:
        """Submit the Flower app in `app_dir` with `run_config` overrides; the run id."""
        app_dir = Path(app_dir).resolve()
        if not (app_dir / "pyproject.toml").is_file():
            raise ControlError(f"app directory {str(app_dir)!r} has no pyproject.toml")
        args = ["run", str(app_dir), _CONNECTION]
        if run_config:
            args += ["--run-config", format_user_config(run_config, field="run_config")]
        return self._json(args, _Started).run_id

    def wait_for_run(self, run_id: int, *, timeout: float) -> RunResult:
        """Wait until run `run_id` finishes (stopping it after `timeout` seconds); its status and log."""
        args = ["log", str(run_id), _CONNECTION, "--stream"]  # the stream ends when the run finishes
        try:
            call = self._call(args, timeout=timeout)
        except FederationTimeout:
            self._stop_quietly(run_id)
            raise FederationTimeout(f"run {run_id} did not finish within {timeout:.0f} s; it was stopped") from None
        if call.returncode != 0:
            raise ControlError(f"`flwr log {run_id}` failed: {_tail(call)}")
        run = self._json(["ls", "--run-id", str(run_id), _CONNECTION], _Runs).runs[0]
        state, _, sub_status = run.status.partition(":")
        if state != "finished" or sub_status not in set(RunStatus):
            raise ControlError(f"run {run_id}: log stream ended while the run is {run.status!r}")
        return RunResult(
            run_id=run_id,
            status=RunStatus(sub_status),
            details=run.status_details,
            elapsed=run.elapsed,
            log=clean_log(call.stdout),
        )

    def stop_run(self, run_id: int) -> None:
        self._json(["stop", str(run_id), _CONNECTION], _Ack)

    def run(
        self, app_dir: Path, *, run_config: Mapping[str, UserConfigValue] | None = None, timeout: float = 300.0
    ) -> RunResult:
        """Submit the app in `app_dir` and wait for the run to finish; see `RunResult.raise_for_status`."""
        return self.wait_for_run(self.start_run(app_dir, run_config=run_config), timeout=timeout)

    def _stop_quietly(self, run_id: int) -> None:
        with contextlib.suppress(FederationError):  # the timeout is the error to report
            self.stop_run(run_id)

    def _json(self, args: list[str], reply: type[ReplyT]) -> ReplyT:
        command = f"`flwr {shlex.join(args)}`"
        call = self._call([*args, "--format", "json"], timeout=self.timeout)
        payload = _parse_json(call.stdout)
        if payload is None or call.returncode != 0 or payload.get("success") is not True:
            reason = payload.get("error-message") if payload else None
            raise ControlError(f"{command} failed: {clean_log(str(reason)) if reason else _tail(call)}")
        try:
            return reply.model_validate(payload)
        except ValidationError as exc:
            raise ControlError(f"{command} replied in an unexpected form: {exc}") from None

    def _call(self, args: list[str], *, timeout: float) -> _Call:
        argv = [flower_executable("flwr"), *args]
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=flower_env(self._home),
                cwd=self._home,
                timeout=timeout,
                check=False,
            )
            call = _Call(argv=argv, returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)
        except subprocess.TimeoutExpired as exc:
            call = _Call(argv=argv, returncode=-1, stdout=_text(exc.stdout), stderr=_text(exc.stderr))
            self._record(call)
            raise FederationTimeout(f"`flwr {shlex.join(args)}` did not return within {timeout:.0f} s") from None
        self._record(call)
        return call

    def _record(self, call: _Call) -> None:
        with self._log_path.open("a", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(call.argv)}  (status {call.returncode})\n{call.stdout}{call.stderr}\n")


def _flower_config(connection: SuperLinkConnection) -> str:
    # JSON strings are valid TOML basic strings.
    return (
        f"[superlink]\ndefault = {json.dumps(_CONNECTION)}\n\n"
        f"[superlink.{_CONNECTION}]\n"
        f"address = {json.dumps(connection.address)}\n"
        f"root-certificates = {json.dumps(str(Path(connection.root_certificates).resolve()))}\n"
    )


def _parse_json(stdout: str) -> dict[str, Any] | None:
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        payload = json.loads(stdout[start:])
    except json.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _tail(call: _Call, lines: int = 15) -> str:
    text = clean_log(call.stderr + call.stdout).strip()
    return "\n".join(text.splitlines()[-lines:]) or f"exit status {call.returncode}, no output"


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
