"""Your own model, data and training loop, federated: the collaborator API end to end.

The model class, its loss, optimizer and evaluation are defined only here (nothing in fedsqueeze
knows them): `collaborator join --app tests.test_own_model:app` runs `app` in each collaborator
process, and the aggregator starts from `--initial-model` (a safetensors file of this model's
initial weights) without importing torch at all. The model has BatchNorm buffers (averaged, the
plan's `model.buffers`), an integer buffer (kept local) and a bfloat16 parameter; the uplink is
compressed; the global metrics come from the collaborators' evaluations (federated evaluation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedsqueeze.plan import Plan

from .conftest import free_port, spawn

COLLABORATORS = 2


class TinyNet(nn.Module):
    """A small conv net for 8x8 digits: BatchNorm, and a per-class scale kept in bfloat16."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, classes)
        self.scale = nn.Parameter(torch.ones(classes, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(h.flatten(1)) * self.scale.float()


def digits(part: int, parts: int) -> tuple[torch.Tensor, ...]:
    """This collaborator's slice of scikit-learn's digits: (x, y) to train on and (x, y) held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    mine = order[part::parts]
    cut = int(0.8 * len(mine))
    return x[mine[:cut]], y[mine[:cut]], x[mine[cut:]], y[mine[cut:]]


def app(ctx) -> None:
    """The collaborator: an ordinary PyTorch loop (its own loss and optimizer) with the API's few lines."""
    torch.manual_seed(0)
    model = TinyNet()
    part = int(ctx.argv[0]) if ctx.argv else 0
    x, y, x_test, y_test = digits(part, COLLABORATORS)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def evaluate(m: nn.Module):
        m.eval()
        with torch.no_grad():
            out = m(x_test)
        return {
            "loss": float(loss_fn(out, y_test)),
            "accuracy": float((out.argmax(1) == y_test).float().mean()),
        }, len(y_test)

    with ctx.join(model, evaluate=evaluate) as federation:
        for rnd in federation:
            model.train()
            for start in range(0, len(y), 32):
                optimizer.zero_grad()
                loss = loss_fn(model(x[start : start + 32]), y[start : start + 32])
                loss.backward()
                optimizer.step()
            rnd.submit(num_samples=len(y), metrics={"loss": float(loss)})


def other_app(ctx) -> None:
    """A collaborator whose model is not the federation's: 11 classes (the first tensor in state_dict order,
    the module's own `scale`, differs first)."""
    ctx.join(TinyNet(classes=11))


PLAN = {
    "model": {"name": "tinynet", "buffers": "average"},
    "task": {"dataset": "own-digits"},
    "rounds": 5,
    "collaborators": {"min": COLLABORATORS, "join_timeout_s": 240},
    "uplink": {"chain": "ef | topk:0.1 | quantize:8 | entropy"},
    "downlink": {"chain": "fp16"},
    "round_timeout_s": 120,
}


def write_initial_model(path: Path) -> None:
    import fedsqueeze

    torch.manual_seed(0)
    fedsqueeze.save_initial_model(TinyNet(), path)


@pytest.mark.slow
def test_an_own_model_federates_with_federated_evaluation(tmp_path: Path, procs: list) -> None:
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    write_initial_model(tmp_path / "model.safetensors")
    port = free_port()
    agg = spawn(["fedsqueeze.aggregator", "serve", "--port", str(port), "--host", "127.0.0.1", "--plan", str(tmp_path / "plan.json"),
                 "--initial-model", str(tmp_path / "model.safetensors"), "--report", str(tmp_path / "report.json")],
                log=tmp_path / "agg.log")  # fmt: skip
    procs.append(agg)
    collabs = [spawn(["fedsqueeze.collaborator", "join", "--server", f"127.0.0.1:{port}", "--no-progress", "--app",
                      "tests.test_own_model:app", "--app-arg", str(i), "--report", str(tmp_path / f"c{i}.json")],
                     log=tmp_path / f"c{i}.log") for i in range(COLLABORATORS)]  # fmt: skip
    procs.extend(collabs)
    torch_loaded = False
    deadline = time.monotonic() + 300
    while agg.poll() is None and time.monotonic() < deadline:
        maps = Path(f"/proc/{agg.pid}/maps").read_text() if Path(f"/proc/{agg.pid}/maps").exists() else ""
        torch_loaded |= "libtorch" in maps
        time.sleep(0.5)
    assert agg.wait(timeout=60) == 0, (tmp_path / "agg.log").read_text()
    for i, c in enumerate(collabs):
        assert c.wait(timeout=120) == 0, (tmp_path / f"c{i}.log").read_text()
    assert not torch_loaded, "the aggregator loaded torch"
    report = json.loads((tmp_path / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["status"] for r in rounds] == ["ok"] * PLAN["rounds"]
    # Every round's model was evaluated by both collaborators on their held-out data (the last one in the
    # evaluation after the last round), and the federated accuracy is the round's accuracy.
    for r in rounds:
        assert (
            r["evaluation"]["collaborators"] == COLLABORATORS and r["accuracy"] == r["evaluation"]["accuracy"]
        )
        assert r["train"]["loss"] > 0
    accuracy = [r["accuracy"] for r in rounds]
    print(
        f"\nfederated accuracy by round: {[f'{a:.3f}' for a in accuracy]}; uplink {report['summary']['up_ratio']:.1f}x"
    )
    assert accuracy[-1] > 0.8 and accuracy[-1] > report["initial_evaluation"]["accuracy"] + 0.3
    assert report["summary"]["up_ratio"] > 5
    assert report["model"]["parameters"] == sum(
        t.numel() for n, t in TinyNet().state_dict().items() if t.is_floating_point()
    )  # weights and BatchNorm's running statistics travel; num_batches_tracked does not


@pytest.mark.slow
def test_a_collaborator_with_another_model_is_refused_naming_the_tensor(tmp_path: Path, procs: list) -> None:
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    write_initial_model(tmp_path / "model.safetensors")
    port = free_port()
    agg = spawn(["fedsqueeze.aggregator", "serve", "--port", str(port), "--host", "127.0.0.1", "--plan", str(tmp_path / "plan.json"),
                 "--initial-model", str(tmp_path / "model.safetensors")], log=tmp_path / "agg.log")  # fmt: skip
    procs.append(agg)
    odd = spawn(["fedsqueeze.collaborator", "join", "--server", f"127.0.0.1:{port}", "--no-progress", "--app",
                 "tests.test_own_model:other_app"], log=tmp_path / "odd.log")  # fmt: skip
    procs.append(odd)
    assert odd.wait(timeout=120) == 1
    lines = (tmp_path / "odd.log").read_text().strip().splitlines()
    assert lines[-1].startswith("error: ") and "tensor 'scale' has shape [11], expected [10]" in lines[-1], (
        lines
    )


def test_a_plan_cannot_name_code_for_a_collaborator() -> None:
    """The plan names data: an unknown field is refused, and a model name is looked up among the built-in
    models only (never imported), with a message pointing at `--app`."""
    from fedsqueeze.model_file import ModelError
    from fedsqueeze.models import build_model
    from fedsqueeze.plan import PlanError

    with pytest.raises(PlanError, match="unknown field"):
        Plan.from_json({"app": "tests.test_own_model:app"})
    with pytest.raises(PlanError, match="unknown field"):
        Plan.from_json({"model": {"module": "tests.test_own_model"}})
    plan = Plan.from_json({"model": {"name": "tests.test_own_model:TinyNet"}})
    with pytest.raises(ModelError, match="not a built-in model.*--app"):
        build_model(plan.model.name, (1, 8, 8), 10)


def test_model_state_keeps_dtypes_devices_and_the_buffer_rule() -> None:
    from fedsqueeze.model_state import buffer_names, layout_of, load_vector, to_vector, travelling

    model = TinyNet()
    assert buffer_names(model) == ["bn.running_mean", "bn.running_var"]
    averaged, local = travelling(model, "average"), travelling(model, "local")
    assert (
        "bn.running_mean" in averaged
        and "bn.running_mean" not in local
        and "bn.num_batches_tracked" not in averaged
    )
    layout = layout_of(averaged)
    assert {t.name: t.dtype for t in layout}["scale"] == "bfloat16"
    assert layout.raw_bytes == 4 * (layout.numel - 10) + 2 * 10
    vec = to_vector(averaged)
    load_vector(averaged, vec * 2)
    assert model.scale.dtype == torch.bfloat16 and torch.allclose(model.scale.float(), torch.full((10,), 2.0))
    assert np.allclose(to_vector(averaged), vec * 2, rtol=1e-2)


def test_an_initial_model_file_reads_back_without_torch(tmp_path: Path) -> None:
    from fedsqueeze.model_file import ModelFileError, load_initial_model
    from fedsqueeze.model_state import buffer_names, layout_of, to_vector, travelling

    write_initial_model(tmp_path / "m.safetensors")
    torch.manual_seed(0)
    model = TinyNet()
    layout, weights, buffers = load_initial_model(tmp_path / "m.safetensors")
    assert layout == layout_of(travelling(model)) and buffers == tuple(buffer_names(model))
    assert np.array_equal(weights, to_vector(travelling(model)))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFileError, match="bad.safetensors"):
        load_initial_model(tmp_path / "bad.safetensors")
