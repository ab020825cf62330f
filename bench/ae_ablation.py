"""The AE against its own parts without the AE: the plan's `ae` stage vs a sparse-sign chain at matched bytes.

For each seed, in-process (`fedsqueeze.simulation`): the plan as it is, the same plan with the uplink chain
replaced by `--chain` and no prepass, and the uncompressed baseline; final and last-5 mean accuracy and
wire bytes per uplink message. Run: python -m bench.ae_ablation [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any


def _run(plan_json: dict[str, Any], uncompressed_baseline: bool = False) -> tuple[float, float, float]:
    from fedsqueeze.plan import Plan
    from fedsqueeze.simulation import run_plan, uncompressed

    plan = Plan.from_json(plan_json)
    report = run_plan(uncompressed(plan) if uncompressed_baseline else plan).report
    acc = [r["accuracy"] for r in report["rounds"]]
    messages = sum(r["participants"] for r in report["rounds"]) or 1
    return acc[-1], statistics.mean(acc[-5:]), report["summary"]["up_wire"] / messages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--plan", default=str(Path(__file__).parents[1] / "fedsqueeze" / "plans" / "ae.json"))
    ap.add_argument(
        "--chain", default="ef | topk:0.0095 | sign | entropy", help="the ablation's uplink chain"
    )
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    args = ap.parse_args(argv)
    base = json.loads(Path(args.plan).read_text())
    print(
        f"{'seed':>4}  {'AE final/last5, B/msg':>26}  {'ablation final/last5, B/msg':>30}  {'baseline final/last5':>21}"
    )
    for seed in args.seeds:
        ae = {**copy.deepcopy(base), "seed": seed}
        ablation = {
            **copy.deepcopy(ae),
            "uplink": {**ae["uplink"], "chain": args.chain},
            "prepass": {"enabled": False},
        }
        a, b, c = _run(ae), _run(ablation), _run(ae, uncompressed_baseline=True)
        print(f"{seed:>4}  {a[0]:>8.2%} / {a[1]:.2%}, {a[2]:6.1f}  {b[0]:>11.2%} / {b[1]:.2%}, {b[2]:6.1f}  "
              f"{c[0]:>12.2%} / {c[1]:.2%}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
