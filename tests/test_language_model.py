"""The built-in language model task: the `stdlib` data set, the `transformer` model, token-level training,
and a federation of it (issue 20's real-size model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsqueeze.models import ModelError, build_model, get_flat
from fedsqueeze.plan import Plan, PlanError
from fedsqueeze.simulation import run_plan
from fedsqueeze.stdlib_text import evenly_spaced
from fedsqueeze.tasks import STDLIB_TEST_WINDOWS, STDLIB_WINDOW, load_dataset, partition
from fedsqueeze.training import evaluate, train_local


@pytest.fixture(scope="module")
def text():  # type: ignore[no-untyped-def]
    return load_dataset("stdlib")


def test_the_stdlib_data_set_is_next_byte_windows_labelled_by_package(text) -> None:  # type: ignore[no-untyped-def]
    assert text.input_shape == (STDLIB_WINDOW,) and text.num_classes == 256
    assert text.x_train.dtype == np.uint8 and text.y_train.shape == text.x_train.shape
    assert len(text.x_test) == STDLIB_TEST_WINDOWS
    # the targets are the inputs shifted by one byte
    assert np.array_equal(text.x_train[:, 1:], text.y_train[:, :-1])
    same_package = np.flatnonzero(text.topics[1:] == text.topics[:-1])  # consecutive windows of one package
    assert np.array_equal(text.x_train[same_package + 1, 0], text.y_train[same_package, -1])
    assert len(text.topics) == len(text.x_train) and len(np.unique(text.topics)) > 100
    assert np.array_equal(text.partition_labels, text.topics)
    # the held-out windows come from files no training window holds
    train_text = text.x_train.tobytes()
    assert sum(bytes(w) in train_text for w in text.x_test[:32]) <= 2


def test_a_dirichlet_split_of_the_text_skews_each_shard_to_a_few_packages(text) -> None:  # type: ignore[no-untyped-def]
    shards = partition(text.partition_labels, 8, "dirichlet", 0.1, 0)
    assert sum(len(s) for s in shards) == len(text.y_train)
    iid = np.bincount(text.topics) / len(text.topics)
    for s in shards:
        share = np.bincount(text.topics[s], minlength=len(iid)) / len(s)
        assert 0.5 * np.abs(share - iid).sum() > 0.3  # total variation from the whole library's mix


def test_the_transformer_is_a_causal_1m_parameter_model_torchscript_can_compile() -> None:
    model = build_model("transformer", (STDLIB_WINDOW,), 256).eval()
    assert get_flat(model).size == sum(p.numel() for p in model.parameters()) == 1_230_848
    tokens = torch.randint(0, 256, (2, STDLIB_WINDOW))
    changed = tokens.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % 256
    with torch.no_grad():
        out, out_changed = model(tokens), model(changed)
        scripted = torch.jit.script(model)(tokens)
    assert out.shape == (2, STDLIB_WINDOW, 256)
    assert torch.allclose(out[:, :40], out_changed[:, :40], atol=1e-5)
    assert not torch.allclose(out[:, 40:], out_changed[:, 40:])
    assert torch.allclose(out, scripted, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "args", "message"),
    [((1, 64), {}, "needs \\(T,\\) token windows"), ((64,), {"d_model": 30, "heads": 4}, "not a multiple")],
)
def test_a_bad_transformer_is_refused_naming_why(shape: tuple[int, ...], args: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model("transformer", shape, 256, args)


def test_token_level_training_takes_exactly_its_steps_and_lowers_the_perplexity(text) -> None:  # type: ignore[no-untyped-def]
    model = build_model("transformer", (STDLIB_WINDOW,), 256, {"d_model": 32, "layers": 1, "heads": 2})
    x, y = text.x_train[:2000], text.y_train[:2000]
    before, _ = evaluate(model, text.x_test, text.y_test)
    assert abs(before - math.log(256)) < 0.3
    steps: list[tuple[int, int]] = []
    metrics = train_local(model, x, y, epochs=1, batch_size=16, lr=3e-3, steps=150, optimizer="adam",
                          on_step=lambda e, b: steps.append((e, b)))  # fmt: skip
    assert len(steps) == 150 and steps[-1][0] == 1  # 125 batches per epoch: the data is reshuffled once
    after, accuracy = evaluate(model, text.x_test, text.y_test)
    assert after < before - 1.0 and accuracy > 0.15
    assert metrics["accuracy"] > 0.1 and metrics["samples"] == 2000


def test_a_plan_names_its_optimizer_and_local_steps() -> None:
    plan = Plan.from_json({"training": {"local_steps": 10, "optimizer": "adam"}})
    assert plan.training.local_steps == 10 and plan.training.optimizer == "adam"
    with pytest.raises(PlanError, match="optimizer"):
        Plan.from_json({"training": {"optimizer": "lbfgs"}})
    with pytest.raises(PlanError, match="local_steps"):
        Plan.from_json({"training": {"local_steps": -1}})


def test_a_compressed_federation_of_the_language_model_learns(text) -> None:  # type: ignore[no-untyped-def]
    plan = Plan.from_json({
        "task": {"dataset": "stdlib", "partition": "dirichlet", "alpha": 0.5},
        "model": {"name": "transformer", "args": {"d_model": 32, "layers": 1, "heads": 2}},
        "rounds": 3, "seed": 0,
        "collaborators": {"min": 4, "fraction": 0.5, "min_per_round": 2},
        "training": {"local_steps": 20, "batch_size": 16, "lr": 0.003, "optimizer": "adam"},
        "uplink": {"chain": "ef | topk:0.05 | quantize:4 | entropy"},
        "downlink": {"chain": "residual | topk:0.1 | quantize:8 | entropy", "prior": "initial"},
    })  # fmt: skip
    res = run_plan(plan, text)
    perplexity = [math.exp(r["loss"]) for r in res.rounds]
    assert len(perplexity) == 3 and perplexity[-1] < 0.6 * 256
    assert res.report["summary"]["up_ratio"] > 10


def test_evenly_spaced_covers_the_range() -> None:
    assert evenly_spaced(5, 3).tolist() == [0, 1, 2]
    assert evenly_spaced(3, 101).tolist() == [0, 50, 100]
