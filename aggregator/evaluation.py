"""What the aggregator knows of the model: its layout and initial weights, and how it is evaluated.

The Federation itself never imports torch: it works on flat float32 vectors and a `Layout`. For
the plan's built-in tasks `builtin_model` builds the plan's model (torch, from the plan's seed) for
its layout and initial weights, and `HeldOutEvaluator` scores the global model on the data set's
held-out split. For a model of the collaborators' own, `InitialModel.from_file` reads the layout and
weights from a safetensors file, and the global model is scored by the collaborators themselves
(`FederatedEvaluation`) and, optionally, by a function of the operator's (`aggregator serve
--evaluate module:function`, which gets the global model as name -> float32 array).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsqueeze.codecs import Layout
from fedsqueeze.plan import Plan

#: global model -> metrics ({"loss": ..., "accuracy": ...}); None: the aggregator does not evaluate.
Evaluator = Callable[[np.ndarray], dict[str, float]]


@dataclass(frozen=True)
class InitialModel:
    layout: Layout
    weights: np.ndarray  # flat float32, in layout order

    @classmethod
    def from_file(cls, path: str | Path, buffers: str = "average") -> InitialModel:
        """From a file written by `fedsqueeze.save_initial_model` (no torch needed); `buffers`: the plan's rule."""
        from fedsqueeze.model_file import load_initial_model

        layout, weights, buffer_names = load_initial_model(path)
        if buffers == "local":  # FedBN: the buffers stay on the collaborators
            sizes = np.array([t.numel for t in layout], dtype=np.int64)
            keep = np.array([t.name not in buffer_names for t in layout])
            weights = weights[np.repeat(keep, sizes)]
            layout = Layout(tuple(t for t, kept in zip(layout, keep, strict=True) if kept))
        return cls(layout, weights)


def builtin_model(plan: Plan, input_shape: tuple[int, ...], num_classes: int) -> tuple[InitialModel, Any]:
    """(initial model, the torch module) of the plan's built-in model."""
    from fedsqueeze.models import build_model, get_flat, model_layout

    module = build_model(plan.model.name, input_shape, num_classes, plan.model.args, plan.seed)
    return InitialModel(model_layout(module), get_flat(module)), module


class HeldOutEvaluator:
    """Loss and accuracy of the global model on the plan's data set's held-out split (torch)."""

    def __init__(self, plan: Plan) -> None:
        from fedsqueeze.tasks import GENERATED, load_plan_dataset, partition

        self.data = load_plan_dataset(plan)
        self.initial, self._module = builtin_model(plan, self.data.input_shape, self.data.num_classes)
        # A generated data set is cut into the plan's shards, the same on every machine: their sizes are known here.
        self.shard_sizes: list[int] | None = None
        if plan.task.dataset in GENERATED:
            shards = partition(
                self.data.partition_labels, plan.num_shards, plan.task.partition, plan.task.alpha, plan.seed
            )
            self.shard_sizes = [len(s) for s in shards]

    def __call__(self, global_model: np.ndarray) -> dict[str, float]:
        from fedsqueeze.models import set_flat
        from fedsqueeze.training import evaluate

        set_flat(self._module, global_model)
        loss, accuracy = evaluate(self._module, self.data.x_test, self.data.y_test)
        return {"loss": loss, "accuracy": accuracy}


class WeightedMean:
    """Metrics reported by several collaborators, averaged with each report's weight (its sample count)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self.reports = 0
        self.samples = 0

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        if weight <= 0:
            return
        for key, value in metrics.items():
            if math.isfinite(value):
                self._sums[key] = self._sums.get(key, 0.0) + weight * value
                self._weights[key] = self._weights.get(key, 0.0) + weight
        self.reports += 1
        self.samples += int(weight)

    def result(self) -> dict[str, float]:
        """Each metric's weighted mean, with how many collaborators and samples it is over."""
        if not self.reports:
            return {}
        out = {k: self._sums[k] / self._weights[k] for k in sorted(self._sums)}
        return {**out, "collaborators": float(self.reports), "samples": float(self.samples)}


class FederatedEvaluation:
    """The collaborators' evaluations of each global model, by the round after which it was the global model.

    A collaborator evaluates the model it was sent before training on it, and reports with its update:
    round r's updates carry the evaluations of the model after round r - 1 (0: the initial model). The
    final model is evaluated in an evaluation phase after the last round (EVALUATE tasks)."""

    MAX_METRICS = 32  # metrics per report at most, names of at most 64 characters

    def __init__(self) -> None:
        self._by_round: dict[int, WeightedMean] = {}
        self.evaluated: dict[int, set[str]] = {}  # model round -> members that reported on it

    def add(self, model_round: int, member_id: str, metrics: Mapping[str, float], samples: int) -> None:
        if member_id in self.evaluated.setdefault(model_round, set()):
            return  # one report per member and model
        clean = {str(k)[:64]: float(v) for k, v in list(metrics.items())[: self.MAX_METRICS]}
        self._by_round.setdefault(model_round, WeightedMean()).add(clean, float(samples))
        self.evaluated[model_round].add(member_id)

    def result(self, model_round: int) -> dict[str, float]:
        mean = self._by_round.get(model_round)
        return mean.result() if mean is not None else {}

    def to_json(self) -> dict[str, Any]:
        return {str(r): sorted(m) for r, m in self.evaluated.items()}
