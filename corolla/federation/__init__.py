"""The Flower app of `platform train`: the coordinator's rounds (ServerApp) and a site's
training step (ClientApp) on Flower's Message API.

`app_dir()` is the directory `flwr run` submits; its pyproject names `server_app:app` and
`client_app:app` of this package, so the FAB carries no code. The generic parts (`rounds`,
`client`, `records`, `progress`) do not import the ML; `server_app` and `client_app` bind
them to `corolla.federation.coordinator.model` and `.site` when a message arrives.
"""

from pathlib import Path

__all__ = ["app_dir"]


def app_dir() -> Path:
    """The Flower app directory to submit (`ControlClient.start_run(app_dir(), ...)`)."""
    return Path(__file__).parent / "fab"
