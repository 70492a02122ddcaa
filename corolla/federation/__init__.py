"""The federation layer: the Flower apps of `platform train` on Flower's Message API.

- `coordinator/`: the ServerApp (`server_app`), the one round loop (`rounds.run_rounds`), the
  uniform mean (`mean`), secure aggregation's coordinator side (`secure`), the spot-check
  ledger (`audits`) and the model side: the starting adapter, held-out scoring through the
  swarm, the result (`model`).
- `site/`: the ClientApp (`client_app`), its message handlers (`handlers`), the node config
  (`env`), secure aggregation's site side (`secure`), a round's spot checks (`audits`) and
  the site's DP-SGD round through the swarm (`round`).
- `messages`: every message content, typed, and the one conversion to and from Flower's
  `RecordDict`; `outcomes`: round outcomes, progress events and the run summary;
  `progress`: `progress.jsonl`; `grid`: what the loop needs of a grid, and an in-process
  grid; `local`: `platform train --in-process` on that grid.

`app_dir()` is the directory `flwr run` submits; its pyproject names
`coordinator.server_app:app` and `site.client_app:app` of this package, so the FAB carries
no code. The generic parts do not import the ML; the apps import it when a message arrives.
"""

from pathlib import Path

__all__ = ["app_dir"]


def app_dir() -> Path:
    """The Flower app directory to submit (`ControlClient.start_run(app_dir(), ...)`)."""
    return Path(__file__).parent / "fab"
