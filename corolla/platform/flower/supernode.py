"""A site's SuperNode as a real `flower-supernode` process.

The SuperNode dials the SuperLink over HTTPS, trusting only `--root-certificates`, and signs
a timestamp on every Fleet request with its `--auth-supernode-private-key`. At start it asks
the SuperLink to activate the node registered under that public key: a key that was not
enrolled is refused (HTTP 412, Flower API error 2004) and the process exits with Flower
exit code 305, as it does when the SuperLink's certificate does not verify. Its clock must
not run more than 5 s ahead of the SuperLink's (Flower's timestamp tolerance).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType

from corolla.platform.flower._process import FlowerProcess, flower_executable
from corolla.platform.flower._user_config import format_user_config
from corolla.platform.flower.config import SuperNodeConfig
from corolla.platform.flower.errors import FederationError

_ACTIVATED = re.compile(r"SuperNode ID: (\d+)")  # logged once the SuperLink has activated the node


class SuperNode:
    """A running `flower-supernode`; its log is `work_dir/<name>.log`."""

    def __init__(self, config: SuperNodeConfig, *, work_dir: Path) -> None:
        self.config = config
        self._process = FlowerProcess(name=config.name, argv=self.command, work_dir=Path(work_dir))
        self._node_id: int | None = None

    @property
    def command(self) -> list[str]:
        config = self.config
        command = [
            flower_executable("flower-supernode"),
            "--superlink",
            config.superlink.address,
            "--root-certificates",
            str(config.superlink.root_certificates),
            "--auth-supernode-private-key",
            str(config.auth_private_key),
            "--host",
            "127.0.0.1",  # the Runtime API is for this node's own SuperExec and ClientApps only
            "--port",
            str(config.runtime_port),
            "--isolation",
            "subprocess",  # the SuperNode starts a SuperExec, which starts one `flwr-clientapp` per message
        ]
        if config.node_config:
            command += ["--node-config", format_user_config(config.node_config, field="SuperNodeConfig.node_config")]
        if config.max_wait_time is not None:
            command += ["--max-wait-time", str(config.max_wait_time)]
        return command

    @property
    def node_id(self) -> int:
        """The id the SuperLink gave this node when its key was registered."""
        if self._node_id is None:
            raise FederationError(f"{self.config.name} has not been activated by the SuperLink (call start())")
        return self._node_id

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    @property
    def running(self) -> bool:
        return self._process.running

    def output(self) -> str:
        """The SuperNode's log so far (its SuperExec and ClientApps log here too)."""
        return self._process.output()

    def start(self) -> SuperNode:
        """Start and wait until the SuperLink has activated this node.

        Raises `ProcessFailed` if the SuperNode gives up (key not enrolled, certificate not
        trusted, SuperLink unreachable for `max_wait_time`), quoting its log.
        """
        self._process.start()
        try:
            self._node_id = self._process.wait_until(
                self._activated, timeout=self.config.start_timeout, what="activation by the SuperLink"
            )
        except BaseException:
            self.stop()
            raise
        return self

    def wait_exit(self, timeout: float) -> int:
        """Wait until the SuperNode exits by itself; its exit status.

        A node whose enrolment is removed (`ControlClient.unregister_supernode`) has its next
        request refused (HTTP 401) and shuts down with status 0, as if asked to.
        """
        return self._process.wait_exit(timeout)

    def stop(self) -> None:
        self._process.stop(grace=self.config.stop_grace)

    def __enter__(self) -> SuperNode:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _activated(self) -> int | None:
        match = _ACTIVATED.search(self._process.output())
        return int(match.group(1)) if match else None
