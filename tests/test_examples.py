"""The examples under examples/, each run as its README says, on small data, over real gRPC processes.

The aggregator starts from the example's initial model (`--initial-model`, no model code) and the
collaborators are the examples' own scripts or apps; the numbers printed are the README's.
"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import free_port, spawn

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "pytorch_digits"


def federate(tmp_path: Path, procs: list, plan: dict, initial_model: Path, collaborators: list[list[str]],
             timeout: float = 600) -> dict:  # fmt: skip
    """Serve `plan` from `initial_model`, run each collaborator command (`{server}` filled in); the run report."""
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    port = free_port()
    agg = spawn(["fedsqueeze.aggregator", "serve", "--host", "127.0.0.1", "--port", str(port), "--plan",
                 str(tmp_path / "plan.json"), "--initial-model", str(initial_model), "--report",
                 str(tmp_path / "report.json")], log=tmp_path / "agg.log")  # fmt: skip
    procs.append(agg)
    collabs = [
        spawn([a.replace("{server}", f"127.0.0.1:{port}") for a in cmd], log=tmp_path / f"c{i}.log")
        for i, cmd in enumerate(collaborators)
    ]
    procs.extend(collabs)
    assert agg.wait(timeout=timeout) == 0, (tmp_path / "agg.log").read_text()
    for i, c in enumerate(collabs):
        assert c.wait(timeout=120) == 0, (tmp_path / f"c{i}.log").read_text()
    return json.loads((tmp_path / "report.json").read_text())  # type: ignore[no-any-return]


def save_initial_model(script_dir: Path, module: str, model: str, path: Path) -> None:
    """The README's one-liner, run next to the example: `fedsqueeze.save_initial_model(module.model, path)`."""
    code = f"import fedsqueeze, torch, {module}; torch.manual_seed(0); "
    code += f"fedsqueeze.save_initial_model({module}.{model}, {str(path)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=script_dir, check=True)


def accuracy_by_round(report: dict, plan: dict, name: str) -> tuple[list[float], dict]:
    """(accuracy by round, summary) of a run whose every planned round must be ok; printed for the README."""
    rounds, summary = report["rounds"], report["summary"]
    accuracy = [r["accuracy"] for r in rounds]
    print(f"\n{name} ({report['model']['parameters']:,} parameters): accuracy by round "
          f"{[round(a, 3) for a in accuracy]}; uplink {summary['up_ratio']:.1f}x, downlink {summary['down_ratio']:.1f}x")  # fmt: skip
    assert [r["status"] for r in rounds] == ["ok"] * plan["rounds"]
    return accuracy, summary


def readme_diff() -> str:
    plain = (DIGITS / "train.py").read_text().splitlines(keepends=True)
    federated = (DIGITS / "train_federated.py").read_text().splitlines(keepends=True)
    return "".join(difflib.unified_diff(plain, federated, "train.py", "train_federated.py", n=1))


def test_the_readme_shows_the_digits_examples_diff_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme_diff() in readme, "README's diff of examples/pytorch_digits is stale:\n" + readme_diff()
    added = [
        line for line in readme_diff().splitlines() if line.startswith("+") and not line.startswith("+++")
    ]
    assert len(added) <= 8, added


@pytest.mark.slow
def test_the_plain_digits_script_trains() -> None:
    out = subprocess.run([sys.executable, str(DIGITS / "train.py"), "--epochs", "2"], capture_output=True,
                         text=True, check=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})  # fmt: skip
    assert out.stdout.count("epoch ") == 2 and "accuracy" in out.stdout


@pytest.mark.slow
def test_the_federated_digits_script(tmp_path: Path, procs: list) -> None:
    save_initial_model(DIGITS, "train", "Net()", tmp_path / "model.safetensors")
    plan = json.loads((DIGITS / "plan.json").read_text())
    script = str(DIGITS / "train_federated.py")
    report = federate(tmp_path, procs, plan, tmp_path / "model.safetensors",
                      [[script, "--server", "{server}", "--part", str(i), "--parts", "2"] for i in range(2)])  # fmt: skip
    accuracy, s = accuracy_by_round(report, plan, "pytorch_digits")
    assert accuracy[-1] > 0.9 and s["up_ratio"] > 50 and s["down_ratio"] > 10
