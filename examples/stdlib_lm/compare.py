"""The same federation compressed (plan.json) and uncompressed (plan_uncompressed.json, identity chains,
same seed, same data and steps), over real gRPC processes on this machine; prints a table of both.

    python compare.py --rounds 10 --steps 30 --parts 2
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PLANS = {"compressed": HERE / "plan.json", "uncompressed": HERE / "plan_uncompressed.json"}


def perplexities(report: dict[str, Any]) -> list[float]:
    """The federated perplexity of the initial model and of the global model after each round."""
    initial = report.get("initial_evaluation", {}).get("perplexity")
    return ([initial] if initial is not None else []) + [
        r["evaluation"]["perplexity"] for r in report["rounds"]
    ]


def table(reports: dict[str, dict[str, Any]]) -> str:
    """One line per run: rounds, perplexity (initial -> final), uplink/downlink wire bytes and ratios."""
    lines = [f"{'run':<13} {'rounds':>6} {'perplexity':>17} {'uplink bytes':>13} {'up x':>6} "
             f"{'downlink bytes':>15} {'down x':>6}"]  # fmt: skip
    for name, report in reports.items():
        s, ppl = report["summary"], perplexities(report)
        lines.append(f"{name:<13} {s['rounds']:>6} {f'{ppl[0]:.1f} -> {ppl[-1]:.2f}':>17} {s['up_wire']:>13,} "
                     f"{s['up_ratio']:>6.1f} {s['down_wire']:>15,} {s['down_ratio']:>6.1f}")  # fmt: skip
    return "\n".join(lines)


def run(plan: dict[str, Any], workdir: Path, parts: int, steps: int, timeout: float = 1800) -> dict[str, Any]:
    """Serve `plan` from workdir/model.safetensors, run `parts` collaborators; the aggregator's run report."""
    (workdir / "plan.json").write_text(json.dumps(plan))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [open(workdir / f"{name}.log", "w") for name in ["agg", *(f"c{i}" for i in range(parts))]]
    commands = [[sys.executable, "-m", "fedsqueeze.aggregator", "serve", "--host", "127.0.0.1", "--port", str(port),
                 "--plan", str(workdir / "plan.json"), "--initial-model", str(workdir / "model.safetensors"),
                 "--report", str(workdir / "report.json")]]  # fmt: skip
    commands += [[sys.executable, str(HERE / "train_federated.py"), "--server", f"127.0.0.1:{port}",
                  "--part", str(i), "--parts", str(parts), "--steps", str(steps), "--threads", "1"] for i in range(parts)]  # fmt: skip
    procs = [
        subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
        for c, log in zip(commands, logs, strict=True)
    ]
    try:
        if procs[0].wait(timeout=timeout) != 0 or any(p.wait(timeout=120) != 0 for p in procs[1:]):
            raise RuntimeError(f"a process failed: see the logs in {workdir}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    return json.loads((workdir / "report.json").read_text())  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=None, help="default: the plans' own")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--parts", type=int, default=2)
    args = parser.parse_args()
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.safetensors"
        code = f"import fedsqueeze, torch, lm; torch.manual_seed(0); fedsqueeze.save_initial_model(lm.TinyLM(), {str(model)!r})"
        subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True)
        for name, path in PLANS.items():
            plan = json.loads(path.read_text())
            plan["collaborators"]["min"] = args.parts
            plan["rounds"] = args.rounds or plan["rounds"]
            workdir = Path(tmp) / name
            workdir.mkdir()
            (workdir / "model.safetensors").symlink_to(model)
            reports[name] = run(plan, workdir, args.parts, args.steps)
            print(
                f"{name}: perplexity by round {[round(p, 2) for p in perplexities(reports[name])]}",
                flush=True,
            )
    print(table(reports))


if __name__ == "__main__":
    main()
