"""examples/stdlib_lm: a byte-level transformer LM federated over the standard library's sources, one run
of packages per collaborator; perplexity by federated evaluation, compressed against uncompressed."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from aggregator.evaluation import FederatedEvaluation

from .test_examples import federate, save_initial_model

LM_DIR = Path(__file__).resolve().parent.parent / "examples" / "stdlib_lm"


def example_module(name: str) -> ModuleType:
    """examples/stdlib_lm/NAME.py, imported under a name of its own (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"stdlib_lm_{name}", LM_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lm, compare = example_module("lm"), example_module("compare")


def test_the_model_is_a_causal_byte_transformer_of_over_a_million_parameters() -> None:
    torch.manual_seed(0)
    model = lm.TinyLM().eval()
    assert sum(p.numel() for p in model.parameters()) >= 1_000_000
    tokens = torch.randint(0, lm.VOCAB, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % lm.VOCAB
    with torch.no_grad():
        out, out_changed = model(tokens), model(changed)
    assert out.shape == (2, 16, lm.VOCAB)
    assert torch.allclose(out[:, :10], out_changed[:, :10], atol=1e-5)  # no peeking at later bytes
    assert not torch.allclose(out[:, 10:], out_changed[:, 10:])


def test_the_split_gives_each_collaborator_its_own_packages() -> None:
    groups = lm.stdlib_groups()
    assert {"asyncio", "email", "json"} <= set(groups) and "test" not in groups
    assert not any("site-packages" in p.parts for files in groups.values() for p in files)
    parts = lm.split_groups(groups, 3)
    assert sorted(n for part in parts for n in part) == sorted(groups)  # each package once
    assert [n for part in parts for n in part] == sorted(groups)  # contiguous runs by name
    sizes = [sum(p.stat().st_size for n in part for p in groups[n]) for part in parts]
    assert max(sizes) < 1.5 * min(sizes), sizes
    assert [len(p) for p in lm.split_groups(groups, len(groups))] == [1] * len(groups)
    with pytest.raises(ValueError):
        lm.split_groups(groups, len(groups) + 1)


def test_a_part_loads_its_training_and_held_out_files_and_evaluates() -> None:
    data = [lm.load_part(i, 2) for i in range(2)]
    assert not set(data[0].packages) & set(data[1].packages)
    for d in data:
        assert d.train.dtype == torch.uint8 and len(d.train) > 1_000_000 and len(d.test) > 50_000
        assert d.test_files == (d.train_files + d.test_files) // lm.HELD_OUT_EVERY
    x, y = lm.evaluation_windows(data[0].test, 8, 32)
    assert x.shape == y.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])
    torch.manual_seed(0)
    model = lm.TinyLM()
    before = lm.evaluate(model, x, y)
    assert abs(before["loss"] - math.log(lm.VOCAB)) < 0.3 and before["perplexity"] == math.exp(before["loss"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    lm.train_steps(model, data[0].train, optimizer, steps=5, batch_size=4, length=32)
    assert lm.evaluate(model, x, y)["perplexity"] < before["perplexity"]


def test_federated_evaluation_averages_any_metric_a_collaborator_reports() -> None:
    evaluation = FederatedEvaluation()
    evaluation.add(1, "a", {"loss": 2.0, "perplexity": 8.0}, 100)
    evaluation.add(1, "b", {"loss": 3.0, "perplexity": 20.0}, 300)
    assert evaluation.result(1) == {"loss": 2.75, "perplexity": 17.0, "collaborators": 2.0, "samples": 400.0}


@pytest.mark.slow
@pytest.mark.timeout(900)  # two federations, a few minutes each on 2 loaded cores
def test_the_federated_lm_compressed_and_uncompressed(tmp_path: Path, procs: list) -> None:
    save_initial_model(LM_DIR, "lm", "TinyLM()", tmp_path / "model.safetensors")
    script, rounds, steps = str(LM_DIR / "train_federated.py"), 6, 20
    reports = {}
    for name, plan_path in compare.PLANS.items():
        plan = {**json.loads(plan_path.read_text()), "rounds": rounds}
        (tmp_path / name).mkdir()
        collaborators = [[script, "--server", "{server}", "--part", str(i), "--parts", "2", "--steps",
                          str(steps), "--threads", "1"] for i in range(2)]  # fmt: skip
        reports[name] = federate(
            tmp_path / name, procs, plan, tmp_path / "model.safetensors", collaborators, timeout=420
        )
    print("\n" + compare.table(reports))
    for name, report in reports.items():
        ppl = compare.perplexities(report)
        print(f"{name}: perplexity by round {[round(p, 2) for p in ppl]}")
        assert [r["status"] for r in report["rounds"]] == ["ok"] * rounds
        assert all(r["evaluation"]["collaborators"] == 2 for r in report["rounds"])
        assert len(ppl) == rounds + 1 and ppl[0] > 200  # the initial model: about uniform over 256 bytes
        assert ppl[-1] < 30 and ppl[-1] < ppl[2] < ppl[1] < ppl[0]
    compressed, uncompressed = (reports[n]["summary"] for n in compare.PLANS)
    assert compressed["up_ratio"] > 50 and compressed["down_ratio"] > 20
    assert uncompressed["up_ratio"] == pytest.approx(1, abs=0.01)
    final = [compare.perplexities(reports[n])[-1] for n in compare.PLANS]
    assert final[0] < 1.3 * final[1]
