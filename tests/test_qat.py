"""Quantization-aware training (`training.qat`, fedsqueeze/qat.py): weights end on the message's grid, and
training through the quantizer learns what post-hoc rounding of a float model loses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsqueeze.codecs import Chain
from fedsqueeze.models import build_model, get_flat, model_layout
from fedsqueeze.plan import Plan, PlanError
from fedsqueeze.qat import WeightQuantizer, qat_chain
from fedsqueeze.tasks import load_digits
from fedsqueeze.training import evaluate, train_local

torch.set_num_threads(1)


def digits_model(seed: int = 0) -> torch.nn.Module:
    return build_model("mlp", (1, 8, 8), 10, {"hidden": [64]}, seed=seed)


def distinct_per_tensor(model: torch.nn.Module) -> list[int]:
    return [len(np.unique(p.detach().numpy())) for p in model.parameters()]


@pytest.mark.parametrize(
    ("config", "problem"),
    [("ef | sign", "stateful"), ("residual | quantize:4", "stateful"), ("nosuchcodec", "nosuchcodec")],
)
def test_plan_refuses_a_qat_chain_that_cannot_shape_weights(config: str, problem: str) -> None:
    with pytest.raises(PlanError, match=rf"training\.qat: .*{problem}"):
        Plan.from_json({"training": {"qat": config}})


@pytest.mark.parametrize(
    ("config", "levels"), [("sign", 2), ("quantize:4,granularity=layer,grid=minmax", 16)]
)
def test_trained_weights_lie_on_the_grid_and_travel_losslessly(config: str, levels: int) -> None:
    data = load_digits()
    model = digits_model()
    chain = qat_chain(config)
    assert chain is not None
    train_local(model, data.x_train, data.y_train, epochs=1, batch_size=32, lr=0.05, momentum=0.9,
                quantizer=WeightQuantizer.of(model, chain))  # fmt: skip
    counts = distinct_per_tensor(model)
    assert max(counts) <= levels and min(counts) >= 2, counts
    # The uplink with the same quantizer and `target: weights` sends exactly the trained model.
    encoded = Chain.parse(config).encode(get_flat(model), model_layout(model))
    assert encoded.stats.nmse < 1e-10


def test_binary_connect_beats_rounding_a_float_model_afterwards() -> None:
    """Seed 003's reason for QAT: a network trained through its 1-bit quantizer keeps its accuracy once binary;
    the same network trained in float and binarised afterwards loses most of it."""
    data = load_digits()
    sign = Chain.parse("sign")

    def accuracy(model: torch.nn.Module) -> float:
        return evaluate(model, data.x_test, data.y_test)[1]

    qat_model, float_model = digits_model(), digits_model()
    kwargs = {"epochs": 5, "batch_size": 32, "lr": 0.05, "momentum": 0.9}
    train_local(
        qat_model, data.x_train, data.y_train, quantizer=WeightQuantizer.of(qat_model, sign), **kwargs
    )
    train_local(float_model, data.x_train, data.y_train, **kwargs)
    float_accuracy = accuracy(float_model)
    WeightQuantizer.of(float_model, sign).quantize()  # post-hoc: round the trained float weights once
    qat_accuracy, post_hoc_accuracy = accuracy(qat_model), accuracy(float_model)
    print(
        f"float {float_accuracy:.3f}, BinaryConnect {qat_accuracy:.3f}, post-hoc sign {post_hoc_accuracy:.3f}"
    )
    assert qat_accuracy > 0.8
    assert qat_accuracy > post_hoc_accuracy + 0.05


def test_a_federation_trains_through_its_quantizer() -> None:
    """`training.qat` in a plan: every collaborator's message is its quantized model, bit for bit."""
    from fedsqueeze.simulation import run_plan

    chain = "quantize:4,granularity=layer,grid=minmax"
    plan = Plan.from_json({
        "task": {"dataset": "digits"}, "model": {"name": "mlp", "args": {"hidden": [32]}}, "rounds": 3,
        "collaborators": {"min": 2}, "training": {"local_epochs": 1, "qat": chain},
        "uplink": {"chain": f"{chain} | zstd", "target": "weights"}, "downlink": {"chain": "identity"},
    })  # fmt: skip
    result = run_plan(plan)
    assert result.rounds[-1]["accuracy"] > 0.5
    errors = [sent["nmse"] for c in result.collaborators for sent in c.sent]
    assert len(errors) == 6 and max(errors) < 1e-10, errors
