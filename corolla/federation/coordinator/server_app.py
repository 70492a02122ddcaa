"""The ServerApp of `platform train`: `run_rounds` with the model's `Coordinator`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from corolla.federation.coordinator.rounds import run_rounds
from corolla.federation.progress import ProgressLog
from corolla.federation.secure import rounds_for
from corolla.training.config import TrainConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from corolla.federation.audits import CoordinatorAudits
    from corolla.federation.coordinator.model import Coordinator  # torch and the model: only in the run

    config = TrainConfig.from_run_config(context.run_config)
    secure = rounds_for(config, context)  # None with --no-secure-agg
    audits = CoordinatorAudits.for_config(config)  # None with --audit-rate 0
    coordinator = Coordinator(config, spot_checker=audits.checker if audits is not None else None)
    try:
        with ProgressLog.in_dir(config.out_dir) as progress:
            run_rounds(grid, config, coordinator, progress=progress, secure=secure, audits=audits)
    finally:
        if audits is not None:
            audits.close()
