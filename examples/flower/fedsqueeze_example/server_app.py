"""ServerApp: Flower's FedAvg (or FedAdam), wrapped by fedsqueeze's CompressedStrategy."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from fedsqueeze.flower import CompressedStrategy

from .task import evaluate, load_split, make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    seed, nodes = int(cfg["seed"]), int(cfg["min-nodes"])
    _, _, x_test, y_test = load_split(seed)
    initial = ArrayRecord(make_model(seed).state_dict())
    common = {"fraction_evaluate": 0.0, "min_train_nodes": nodes, "min_available_nodes": nodes}
    if cfg["strategy"] == "fedadam":
        strategy: Strategy = FedAdam(**common, eta=float(cfg["eta"]), beta_1=float(cfg["beta1"]))
    elif cfg["strategy"] == "fedavg":
        strategy = FedAvg(**common)
    else:
        raise ValueError(f"strategy must be 'fedavg' or 'fedadam', got {cfg['strategy']!r}")
    if cfg["compress"]:
        strategy = CompressedStrategy(
            strategy,
            uplink=str(cfg["uplink"]),
            downlink=str(cfg["downlink"]),
            prior=initial if cfg["prior"] else None,
        )

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = make_model(seed)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, x_test, y_test)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=central_evaluate,
    )
    if cfg["report"]:
        evaluations = result.evaluate_metrics_serverapp
        report = {
            "config": dict(cfg),
            "accuracy": {r: float(m["accuracy"]) for r, m in evaluations.items()},
            "loss": {r: float(m["loss"]) for r, m in evaluations.items()},
            "bytes": {
                r: {"down": vars(b.down), "up": vars(b.up)}
                for r, b in getattr(strategy, "rounds", {}).items()
            },
        }
        Path(str(cfg["report"])).write_text(json.dumps(report, indent=1))
