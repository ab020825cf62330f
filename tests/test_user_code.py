"""The operator's own code named on a command line: `--app` and `--evaluate`, and the initial-model file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsqueeze.user_code import UserCodeError, load_callable


def test_a_function_loads_from_a_module_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "helper.py").write_text("SCALE = 3\n")
    (tmp_path / "mine.py").write_text("import helper\ndef f(x):\n    return helper.SCALE * x\n")
    assert load_callable(f"{tmp_path / 'mine.py'}:f", "--app")(2) == 6  # its folder's modules import
    monkeypatch.chdir(tmp_path)
    assert load_callable("mine:f", "--app")(1) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must be module:function"),
        ("no_such_module_xyz:f", "cannot load no_such_module_xyz"),
        ("missing.py:f", "no such file: missing.py"),
        ("json:no_such_function", "json has no function 'no_such_function'"),
    ],
)
def test_bad_specs_name_the_flag_and_the_problem(spec: str, message: str) -> None:
    with pytest.raises(UserCodeError, match="--evaluate") as info:
        load_callable(spec, "--evaluate")
    assert message in str(info.value)


def test_the_aggregators_evaluate_gets_named_arrays_of_the_global_model(tmp_path: Path) -> None:
    from aggregator.cli import load_evaluator
    from aggregator.evaluation import InitialModel

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    path = tmp_path / "m.safetensors"
    __import__("fedsqueeze").save_initial_model(model, path)
    (tmp_path / "server_eval.py").write_text(
        "def evaluate(tensors):\n"
        "    return {'weight_sum': float(tensors['0.weight'].sum()), 'count': len(tensors)}\n"
    )
    initial = InitialModel.from_file(path)
    evaluator = load_evaluator(f"{tmp_path / 'server_eval.py'}:evaluate", initial)
    metrics = evaluator(initial.weights)
    assert metrics == {"weight_sum": pytest.approx(float(model[0].weight.detach().sum())), "count": 6.0}
    # Under FedBN's "local" rule the same file leaves the BatchNorm statistics out.
    local = InitialModel.from_file(path, "local")
    assert [t.name for t in local.layout] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert np.array_equal(local.weights, initial.weights[: local.layout.numel])
    assert load_evaluator(f"{tmp_path / 'server_eval.py'}:evaluate", local)(local.weights)["count"] == 4


def test_evaluate_without_an_initial_model_exits_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from aggregator.cli import load_evaluator

    with pytest.raises(SystemExit) as info:
        load_evaluator("json:loads", None)
    assert info.value.code != 0 and "--evaluate needs --initial-model" in capsys.readouterr().err


def test_running_variances_stay_non_negative_when_loaded() -> None:
    from fedsqueeze.model_state import load_vector, to_vector, travelling

    model = nn.BatchNorm1d(4)
    tensors = travelling(model)
    vector = to_vector(tensors)
    vector[-4:] = [-0.5, 0.0, 1.0, 2.0]  # running_var after a lossy update
    load_vector(tensors, vector, model)
    assert torch.equal(model.running_var, torch.tensor([0.0, 0.0, 1.0, 2.0]))
