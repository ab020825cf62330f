"""What the aggregator knows of the model: its layout and initial weights, and how to evaluate it.

The Federation itself never imports torch: it works on flat float32 vectors and a `Layout`. For
the plan's built-in tasks `builtin_model` builds the plan's model (torch, from the plan's seed) for
its layout and initial weights, and `HeldOutEvaluator` scores the global model on the data set's
held-out split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
                self.data.y_train, plan.num_shards, plan.task.partition, plan.task.alpha, plan.seed
            )
            self.shard_sizes = [len(s) for s in shards]

    def __call__(self, global_model: np.ndarray) -> dict[str, float]:
        from fedsqueeze.models import set_flat
        from fedsqueeze.training import evaluate

        set_flat(self._module, global_model)
        loss, accuracy = evaluate(self._module, self.data.x_test, self.data.y_test)
        return {"loss": loss, "accuracy": accuracy}
