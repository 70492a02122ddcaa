"""The ServerApp of `platform train`: `run_rounds` with the model's `Coordinator`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from corolla.federation.coordinator.rounds import run_rounds
from corolla.federation.coordinator.secure import SecureRounds
from corolla.federation.messages import run_key
from corolla.federation.progress import ProgressLog
from corolla.training.config import TrainConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from corolla.federation.coordinator.audits import CoordinatorAudits  # the ledger: only in the run
    from corolla.federation.coordinator.model import Coordinator  # torch and the model: only in the run

    config = TrainConfig.from_run_config(context.run_config)
    secure = SecureRounds.for_config(config, run_key=run_key(context))  # None with --no-secure-agg
    audits = CoordinatorAudits.for_config(config)  # None with --audit-rate 0
    coordinator = Coordinator(config, spot_checker=audits.checker if audits is not None else None)
    try:
        with ProgressLog.in_dir(config.out_dir) as progress:
            run_rounds(grid, config, coordinator, progress=progress, secure=secure, audits=audits)
    finally:
        if audits is not None:
            audits.close()
