"""The SuperLink as a real `flower-superlink` process, with TLS and SuperNode authentication.

In flwr 1.42 the SuperLink is one HTTPS server (uvicorn) on `--host`/`--port` serving the
Fleet API (SuperNodes), the Control API (`flwr` CLI) and the Runtime API (its ServerApps);
the old per-API gRPC addresses are deprecated. `--enable-supernode-auth` makes it accept
only SuperNodes whose public key was registered through the Control API beforehand
(`ControlClient.register_supernode`). The server does not ask for client certificates:
`--ssl-ca-certfile` is only passed on to its own SuperExec as the trust root.
"""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path
from types import TracebackType

from corolla.platform.flower._process import FlowerProcess, flower_executable
from corolla.platform.flower.config import SuperLinkConfig, SuperLinkConnection, dial_host
from corolla.platform.flower.errors import FederationError


class SuperLink:
    """A running `flower-superlink`; its log is `work_dir/<name>.log`."""

    def __init__(self, config: SuperLinkConfig, *, work_dir: Path) -> None:
        self.config = config
        self._process = FlowerProcess(name=config.name, argv=self.command, work_dir=Path(work_dir))

    @property
    def command(self) -> list[str]:
        config = self.config
        command = [
            flower_executable("flower-superlink"),
            "--ssl-ca-certfile",
            str(config.tls.ca_cert),
            "--ssl-certfile",
            str(config.tls.cert),
            "--ssl-keyfile",
            str(config.tls.key),
            "--enable-supernode-auth",
            "--host",
            config.host,
            "--port",
            str(config.port),
            "--isolation",
            "subprocess",  # the SuperLink starts a SuperExec, which starts one `flwr-serverapp` per run
            "--disable-runtime-dependency-installation",  # offline: never `uv sync` an app's dependencies
        ]
        if config.database is not None:
            command += ["--database", str(config.database)]
        return command

    @property
    def connection(self) -> SuperLinkConnection:
        """How a client on this machine reaches the SuperLink."""
        return SuperLinkConnection(
            address=f"{dial_host(self.config.host)}:{self.config.port}", root_certificates=self.config.tls.ca_cert
        )

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    @property
    def running(self) -> bool:
        return self._process.running

    def output(self) -> str:
        """The SuperLink's log so far (its SuperExec and ServerApps log here too)."""
        return self._process.output()

    def start(self) -> SuperLink:
        """Start and wait until `/health` answers over TLS verified against the CA."""
        self._process.start()
        try:
            self._process.wait_until(self._healthy, timeout=self.config.start_timeout, what="serving HTTPS")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._process.stop(grace=self.config.stop_grace)

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _healthy(self) -> bool | None:
        host = dial_host(self.config.host).strip("[]")
        context = ssl.create_default_context(cafile=str(self.config.tls.ca_cert))
        connection = http.client.HTTPSConnection(host, self.config.port, context=context, timeout=2.0)
        try:
            connection.request("GET", "/health")
            return True if connection.getresponse().status == 200 else None
        except ssl.SSLCertVerificationError as exc:
            # The SuperLink's SuperExec dials the same address with the same CA: runs would hang.
            raise FederationError(
                f"{self.config.name}: its certificate {str(self.config.tls.cert)!r} does not verify against "
                f"{str(self.config.tls.ca_cert)!r} for host {host!r}: {exc.verify_message}"
            ) from exc
        except OSError:  # not listening yet
            return None
        finally:
            connection.close()
