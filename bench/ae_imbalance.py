"""Seed 001 section 5.2 with a stand-in: two collaborators with an input imbalance, the AE on both.

The paper: CIFAR-10 on colour images at one collaborator, grayscale at the other, 40 rounds of 5 local
epochs, each update through its collaborator's AE, 1720x per message. Here: digits (the MLP), shard 0 as it
is and shard 1 inverted (1 - x), 40 rounds of 5 local epochs, in-process (`fedsqueeze.simulation`, the real
Federation), with the plan's AE (fedsqueeze/plans/ae.json: chunked linear AE, 8-bit decoder upload), the
same with dynamic re-training (`prepass.retrain_nmse`), and uncompressed FedAvg. The global model is scored
on the test split both ways (plain and inverted). Bytes: wire bytes per uplink message and its ratio (the
paper's 1720x is this ratio), decoder uploads, eq. 4 as run (decoders per collaborator included), and the
total ratio (everything that travelled both ways against fp32). Run: python -m bench.ae_imbalance
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

PAPER_RATIO = 1720


class BothWays:
    """The aggregator's evaluation: accuracy on the plain and on the inverted test split (the mean is reported)."""

    def __init__(self, plan: Any, data: Any) -> None:
        from fedsqueeze.aggregator.evaluation import builtin_model

        self.data = data
        _, self.module = builtin_model(plan, data.input_shape, data.num_classes)
        self.history: list[
            tuple[float, float]
        ] = []  # (plain, inverted) after each round, the initial model first

    def __call__(self, global_model: np.ndarray) -> dict[str, float]:
        from fedsqueeze.models import set_flat
        from fedsqueeze.training import evaluate

        set_flat(self.module, global_model)
        loss_p, acc_p = evaluate(self.module, self.data.x_test, self.data.y_test)
        loss_i, acc_i = evaluate(self.module, 1.0 - self.data.x_test, self.data.y_test)
        self.history.append((acc_p, acc_i))
        return {"loss": (loss_p + loss_i) / 2, "accuracy": (acc_p + acc_i) / 2}


def run(plan_json: dict[str, Any], uncompressed_baseline: bool = False) -> dict[str, Any]:
    from fedsqueeze.codecs.autoencoder import AE_NMSE
    from fedsqueeze.plan import Plan
    from fedsqueeze.simulation import uncompressed
    from fedsqueeze.simulation.inprocess import InProcessFederation
    from fedsqueeze.tasks import load_plan_dataset

    plan = Plan.from_json(plan_json)
    if uncompressed_baseline:
        plan = uncompressed(plan)
    data = load_plan_dataset(plan)
    sim = InProcessFederation(plan, data)
    inverted = sim.collaborators[1].step.trainer
    inverted.inner.x = (1.0 - inverted.inner.x).astype(np.float32)  # its prepass trains on the same data
    evaluator = BothWays(plan, data)
    sim.fed.evaluate = evaluator
    by_round: dict[int, list[float]] = {}  # the AE part's NMSE on each update, as its encoding left it

    def traced(c: Any) -> Any:
        finish = c.step.finish

        def wrapper(download: Any, *args: Any, **kwargs: Any) -> Any:
            record = finish(download, *args, **kwargs)
            state = c.states.up.stage(0)
            if record is not None and AE_NMSE in state:
                by_round.setdefault(download.round, []).append(float(state[AE_NMSE][0]))
            return record

        return wrapper

    for c in sim.collaborators:
        c.step.finish = traced(c)
    t0 = time.perf_counter()
    report = sim.run().report
    nmse = [statistics.mean(by_round[k]) for k in sorted(by_round)]
    s = report["summary"]
    messages = sum(r["participants"] for r in report["rounds"]) or 1
    acc = [r["accuracy"] for r in report["rounds"]]
    plain, inv = evaluator.history[-1]
    retrains = [
        r["round"] for c in sim.collaborators if c.prepass for r in c.prepass.record.get("retrains", [])
    ]
    return {"final": acc[-1], "last5": statistics.mean(acc[-5:]), "plain": plain, "inverted": inv,
            "per_message": s["up_wire"] / messages, "raw": report["model"]["raw_bytes"],
            "decoder": s["decoder"], "uploads": sum(((report.get("prepass") or {}).get("decoders") or {}).values()),
            "sr": s.get("savings_ratio"), "total": s.get("total_ratio"), "retrains": sorted(retrains),
            "nmse": nmse, "seconds": time.perf_counter() - t0}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--plan", default=str(Path(__file__).parents[1] / "fedsqueeze" / "plans" / "ae.json"))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--local-epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--retrain-nmse", type=float, default=0.6, help="prepass.retrain_nmse of the re-training run"
    )
    ap.add_argument("--max-retrains", type=int, default=3, help="prepass.max_retrains of the re-training run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    base = json.loads(Path(args.plan).read_text())
    base.update(rounds=args.rounds, seed=args.seed)
    base["collaborators"] = {**base["collaborators"], "min": 2}
    base["training"] = {**base["training"], "local_epochs": args.local_epochs}
    retrain = copy.deepcopy(base)
    retrain["prepass"].update(
        allow_retrain=True, retrain_nmse=args.retrain_nmse, max_retrains=args.max_retrains
    )
    variants = {
        "uncompressed FedAvg": (base, True),
        "AE (the plan's)": (base, False),
        f"AE + re-training (>{args.retrain_nmse:g}, max {args.max_retrains})": (retrain, False),
    }
    print(f"digits, collaborator 0 plain / collaborator 1 inverted (1 - x); {args.rounds} rounds x "
          f"{args.local_epochs} local epochs, seed {args.seed}; accuracy on the test split plain / inverted")  # fmt: skip
    header = (f"{'run':<34} {'final (plain/inv.)':>22} {'last-5':>7} {'B/msg':>7} {'ratio/msg':>10} "
              f"{'decoders':>15} {'SR eq.4':>8} {'total':>7} {'re-trained at':>14} {'s':>5}")  # fmt: skip
    print(header)
    results: dict[str, Any] = {}
    for name, (plan_json, baseline) in variants.items():
        r = run(plan_json, baseline)
        results[name] = r
        ratio = r["raw"] / r["per_message"]
        decoders = f"{r['decoder']:,} B ({r['uploads']})" if r["uploads"] else "-"
        sr = f"{r['sr']:.3g}" if r["uploads"] else "-"
        print(f"{name:<34} {r['final']:>7.2%} ({r['plain']:.1%}/{r['inverted']:.1%}) {r['last5']:>7.2%} "
              f"{r['per_message']:>7.1f} {ratio:>9.0f}x {decoders:>15} {sr:>8} {r['total']:>6.1f}x "
              f"{','.join(map(str, r['retrains'])) or '-':>14} {r['seconds']:>5.0f}", flush=True)  # fmt: skip
        if r["nmse"]:
            marks = [1, 5, 10, 20, 30, 40]
            trace = ", ".join(f"r{m} {r['nmse'][m - 1]:.3f}" for m in marks if m <= len(r["nmse"]))
            print(f"{'':<34} AE part NMSE (mean of the 2): {trace}")
    print(
        f"seed 001 section 5.2 (CIFAR-10 colour/grayscale, fully connected AE): {PAPER_RATIO}x per message, "
        "decoder not counted"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
