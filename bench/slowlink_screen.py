"""Which chain could be 50x faster to target than FedAvg on a slow link? An in-process screen.

    python -m bench.slowlink_screen [--hidden 1024,1024] [--horizon 30] [--jobs 2] [--out docs/benchmarks.md]

`bench.slowlink` measures time to target with real processes over shaped links, a few chains at a time
(root, minutes per chain). This screens more chains on the same plan in-process (`fedsqueeze.simulation`,
the same federation code, no transport): each runs until it reaches `bench.slowlink`'s target or the
horizon, and gives its rounds to target and mean bytes per message. A chain's time to target at the
link is then bounded below by

    rounds x (floor + uplink bytes x 8 / uplink rate + downlink bytes x 8 / downlink rate)

with `floor` the seconds of a round in which almost nothing travels (training, codec time, aggregation,
evaluation, round trips; `bench.slowlink` measured 0.76 s for its fastest chain on the 1.1M-parameter
MLP). FedAvg's row uses the same formula, so the speed-up column compares like with like; the real
runs in `bench.slowlink` measured FedAvg's 17 rounds at 702 s where this formula gives 673 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .common import chain_label, downlink_label, int_list, replace_section
from .fl_bench import ADAM, ADAM_B05, CONTEXT, TOPK1_Q4
from .slowlink import RECIPE_DOWN, RECIPE_UP, in_process_target, make_plan, mlp_parameters

FINE_DOWN = {"chain": f"residual | lattice:0.01,{CONTEXT} | entropy", "prior": "initial"}
RECIPE = {"chain": RECIPE_DOWN, "prior": "initial"}
Q2_MSE = "ef | quantize:2,clip=mse | entropy"
# (name, uplink chain, downlink chain or spec, server optimizer or None)
CANDIDATES: list[tuple[str, str, str | dict[str, Any], dict[str, Any] | None]] = [
    ("FedAvg (identity)", "identity", "identity", None),
    ("FedAdam (identity)", "identity", "identity", ADAM),
    ("recipe: STC 0.5% + FedAdam b1 0.5 / lattice 0.1", RECIPE_UP, RECIPE, ADAM_B05),
    ("recipe, downlink lattice 0.01", RECIPE_UP, FINE_DOWN, ADAM_B05),
    ("recipe, FedAdam b1 0.9", RECIPE_UP, RECIPE, ADAM),
    ("STC 1% + FedAdam b1 0.5 / lattice 0.1", f"ef:0.8 | stc:0.01,{CONTEXT} | entropy", RECIPE, ADAM_B05),
    ("top-k 1% q4 + FedAdam b1 0.5 / lattice 0.1", TOPK1_Q4, RECIPE, ADAM_B05),
    ("top-k 1% q4 + FedAdam / lattice 0.1", TOPK1_Q4, RECIPE, ADAM),
    ("sign + EF + FedAdam / identity", "ef | sign", "identity", ADAM),
    ("2-bit MSE-clipped + EF + FedAdam / identity", Q2_MSE, "identity", ADAM),
    ("2-bit MSE-clipped + EF + FedAdam / lattice 0.01", Q2_MSE, FINE_DOWN, ADAM),
    ("PowerSGD rank 4 + EF + FedAdam / lattice 0.1", "ef | powersgd:4 | fp16", RECIPE, ADAM),
]

Job = tuple[str, str, Any, Any, int, int, int, list[int], float]


def screen_one(job: Job) -> dict[str, Any]:
    """One chain in-process, stopped at the first round at the target."""
    import torch

    from fedsqueeze.plan import Plan
    from fedsqueeze.simulation import run_plan

    torch.set_num_threads(1)
    name, up, down, optimizer, n, horizon, seed, hidden, target = job
    extra = {"aggregation": {"server_optimizer": optimizer}} if optimizer else None
    plan = make_plan(up, down, n, horizon, seed, extra, hidden)
    start = time.perf_counter()
    res = run_plan(Plan.from_json(plan), on_round=lambda r: (r.accuracy or 0.0) >= target)
    rounds = res.rounds
    messages = max(1, sum(r["participants"] for r in rounds))
    hit = next((r["round"] for r in rounds if r["accuracy"] >= target), None)
    return {
        "name": name,
        "hit": hit,
        "ran": len(rounds),
        "last": rounds[-1]["accuracy"],
        "best": max(r["accuracy"] for r in rounds),
        "up": sum(r["bytes"]["up_wire"] for r in rounds) / messages,
        "down": sum(r["bytes"]["down_wire"] for r in rounds) / messages,
        "wall": time.perf_counter() - start,
    }


def link_seconds(row: dict[str, Any], floor: float, up_mbit: float, down_mbit: float) -> float:
    """The lower bound on a round's seconds at these rates (see the module's docstring)."""
    return float(floor + row["up"] * 8 / (up_mbit * 1e6) + row["down"] * 8 / (down_mbit * 1e6))


def table(
    candidates: list[tuple[str, str, Any, Any]],
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    target: float,
    wall: float,
) -> list[str]:
    base = rows[0]
    base_time = (
        base["hit"] * link_seconds(base, args.floor_s, args.up_mbit, args.down_mbit) if base["hit"] else None
    )
    lines = [
        f"Command: `python -m bench.slowlink_screen --hidden {','.join(map(str, args.hidden))} --horizon {args.horizon}` "
        f"({wall / 60:.1f} min wall, {args.jobs} processes). In-process, the plan of `bench.slowlink` (MNIST-1D, Dirichlet 0.5, "
        f"{args.collaborators} collaborators, the MLP with hidden layers {args.hidden}, {mlp_parameters(args.hidden):,} "
        f"parameters, 1 local epoch, seed {args.seed}); target {100 * target:.2f} % (the same in-process FedAvg rule); each "
        f"chain runs until the target or round {args.horizon}. Time bound: rounds x ({args.floor_s:g} s + uplink bytes at "
        f"{args.up_mbit:g} Mbit/s + downlink bytes at {args.down_mbit:g} Mbit/s); 50x needs no more than "
        + (f"{base_time / 50:.1f} s." if base_time else "(FedAvg did not reach the target)."),
        "",
        "| chain | uplink | downlink | rounds to target | best accuracy | uplink bytes / message | downlink bytes / message | time bound | speed-up bound |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for (_, up, down, optimizer), row in zip(candidates, rows, strict=True):
        bound = (
            row["hit"] * link_seconds(row, args.floor_s, args.up_mbit, args.down_mbit) if row["hit"] else None
        )
        speed = f"{base_time / bound:.1f}x" if (bound and base_time) else "-"
        rounds = row["hit"] or f"not in {row['ran']}"
        lines.append(
            f"| {row['name']} | {chain_label(up, server_optimizer=optimizer)} | {downlink_label(down)} | "
            f"{rounds} | {100 * row['best']:.2f} % | {row['up']:,.0f} | {row['down']:,.0f} | "
            f"{f'{bound:.1f} s' if bound else '-'} | {speed} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int_list, default=[1024, 1024])
    parser.add_argument("--collaborators", type=int, default=4)
    parser.add_argument(
        "--rounds", type=int, default=20, help="FedAvg's rounds for the target (bench.slowlink's)"
    )
    parser.add_argument("--horizon", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--up-mbit", type=float, default=1.0)
    parser.add_argument("--down-mbit", type=float, default=10.0)
    parser.add_argument("--floor-s", type=float, default=0.76, help="seconds of a round when nothing travels")
    parser.add_argument("--only", type=int, help="the first N candidates (a smoke run)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file to update (e.g. docs/benchmarks.md)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    target = in_process_target(args.collaborators, args.rounds, args.seed, args.hidden)
    print(f"target {100 * target:.2f} %", flush=True)
    candidates = CANDIDATES[: args.only] if args.only else CANDIDATES
    jobs = [(name, up, down, opt, args.collaborators, args.horizon, args.seed, args.hidden, target)
            for name, up, down, opt in candidates]  # fmt: skip
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(screen_one, jobs))
    for row in rows:
        print(f"  {row['name']}: {row['hit'] or 'not reached'} ({row['wall']:.0f} s)", flush=True)
    lines = table(candidates, rows, args, target, time.perf_counter() - start)
    print("\n".join(lines))
    if args.out is not None:
        replace_section(args.out, "slowlink-screen", "Slow links: chains screened in-process for 50x", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
