"""ServerApp: `run_rounds` with a coordinator that has two small arrays and no model.

`evaluate` reports the mean of the weights as the "accuracy", so the test can read the
aggregate of every round from the progress events.
"""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from corolla.federation.coordinator.rounds import run_rounds
from corolla.federation.coordinator.secure import SecureRounds
from corolla.federation.messages import Weights, run_key
from corolla.federation.outcomes import RunSummary
from corolla.federation.progress import ProgressLog
from corolla.training.config import TrainConfig

SHAPES = {
    "model.layers.0.self_attn.q_proj.lora_A.weight": (2, 3),
    "model.layers.0.self_attn.q_proj.lora_B.weight": (3,),
}


class FakeCoordinator:
    def __init__(self, config: TrainConfig) -> None:
        self.out_dir = Path(config.out_dir)

    def initial_weights(self) -> Weights:
        return {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}

    def evaluate(self, weights: Weights, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
        if progress is not None:
            progress(1, 1)
        mean = float(np.mean(np.concatenate([w.ravel() for w in weights.values()])))
        return {"loss": 10.0 - mean, "accuracy": mean, "chance": 0.25}

    def save(self, weights: Weights, summary: RunSummary) -> Path:
        adapter = self.out_dir / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        np.savez(adapter / "weights.npz", **weights)  # type: ignore[arg-type]
        (self.out_dir / "summary.json").write_text(json.dumps(summary.to_json()), encoding="utf-8")
        return adapter


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = TrainConfig.from_run_config(context.run_config)
    secure = SecureRounds.for_config(config, run_key=run_key(context))
    with ProgressLog.in_dir(config.out_dir) as progress:
        run_rounds(grid, config, FakeCoordinator(config), progress=progress, secure=secure)
