"""Which chain could be 50x faster to target than FedAvg on a slow link? An in-process screen.

    python -m bench.slowlink_screen [--hidden 1024,1024] [--horizon 30] [--seeds 0,1,2] [--jobs 2] [--out docs/benchmarks.md]

`bench.slowlink` measures time to target with real processes over shaped links, a few chains at a time
(root, minutes per chain). This screens more chains on the same plan in-process (`fedsqueeze.simulation`,
the same federation code, no transport): each runs until it reaches `bench.slowlink`'s target or the
horizon, on each seed (with that seed's target), and gives its rounds to target and mean bytes per
message. A chain's time to target at the link is then bounded below by

    rounds x (floor + uplink bytes x 8 / uplink rate + downlink bytes x 8 / downlink rate)

with `floor` the seconds of a round in which almost nothing travels (training, codec time, aggregation,
evaluation, round trips; `bench.slowlink` measured 0.76 s for its fastest chain on the 1.1M-parameter
MLP, before the aggregator encoded one download per round for all collaborators in the same state; the
slow-link recipe's real rounds now leave 0.64 s). FedAvg's row uses the same formula, so the speed-up
column compares like with like; the real runs in `bench.slowlink` measured FedAvg's 17 rounds at 702 s
where this formula gives 672 s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .common import chain_label, downlink_label, int_list, replace_section
from .fl_bench import ADAM, ADAM_B05, CONTEXT, TOPK1_Q4
from .slowlink import (
    ADAM_SLOW,
    RECIPE_DOWN,
    RECIPE_UP,
    SLOW_DOWN,
    SLOW_UP,
    in_process_target,
    make_plan,
    mlp_parameters,
)

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
    # the slow-link recipe (bench.slowlink's), then one change at a time
    ("slow-link recipe: STC 2% + FedAdam lr 0.01 b1 0.5 / lattice 0.003", SLOW_UP, SLOW_DOWN, ADAM_SLOW),
    (
        "slow-link recipe, downlink lattice 0.1",
        SLOW_UP,
        {**SLOW_DOWN, "chain": "residual | lattice:0.1 | entropy"},
        ADAM_SLOW,
    ),
    ("slow-link recipe, downlink uncompressed", SLOW_UP, "identity", ADAM_SLOW),
    ("slow-link recipe, uplink STC 0.5%", SLOW_UP.replace("0.02", "0.005"), SLOW_DOWN, ADAM_SLOW),
    ("slow-link recipe, FedAdam lr 0.03", SLOW_UP, SLOW_DOWN, ADAM_B05),
    ("slow-link recipe, FedAdam lr 0.015", SLOW_UP, SLOW_DOWN, {**ADAM_SLOW, "lr": 0.015}),
    ("slow-link recipe, FedAdam lr 0.007", SLOW_UP, SLOW_DOWN, {**ADAM_SLOW, "lr": 0.007}),
    ("slow-link recipe, FedAdam beta1 0.7", SLOW_UP, SLOW_DOWN, {**ADAM_SLOW, "beta1": 0.7}),
    ("slow-link recipe, FedAdam beta2 0.999", SLOW_UP, SLOW_DOWN, {**ADAM_SLOW, "beta2": 0.999}),
    ("slow-link recipe, FedAdam tau 0.01", SLOW_UP, SLOW_DOWN, {**ADAM_SLOW, "tau": 0.01}),
    ("slow-link recipe, error feedback 1.0", SLOW_UP.replace("ef:0.8", "ef"), SLOW_DOWN, ADAM_SLOW),
    ("slow-link recipe, uplink STC 3%", SLOW_UP.replace("0.02", "0.03"), SLOW_DOWN, ADAM_SLOW),
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
    rows: dict[int, list[dict[str, Any]]],
    args: argparse.Namespace,
    targets: dict[int, float],
    wall: float,
) -> list[str]:
    """One line per candidate: rounds, bytes and the time bound for each seed, and the speed-up bound
    against FedAvg (the first candidate) of the same seed."""
    seeds = list(rows)

    def bound(row: dict[str, Any]) -> float | None:
        return (
            row["hit"] * link_seconds(row, args.floor_s, args.up_mbit, args.down_mbit) if row["hit"] else None
        )

    base = {seed: bound(rows[seed][0]) for seed in seeds}
    per_seed = " / ".join(f"{100 * targets[seed]:.2f} %" for seed in seeds)
    need = " / ".join(f"{b / 50:.1f} s" if b else "-" for b in base.values())
    match = f' --match "{args.match}"' if args.match else ""
    lines = [
        f"Command: `python -m bench.slowlink_screen --hidden {','.join(map(str, args.hidden))} --horizon {args.horizon} "
        f"--seeds {','.join(map(str, seeds))}{match}` ({wall / 60:.1f} min wall, {args.jobs} processes). In-process, the plan of "
        f"`bench.slowlink` (MNIST-1D, Dirichlet 0.5, {args.collaborators} collaborators, the MLP with hidden layers "
        f"{args.hidden}, {mlp_parameters(args.hidden):,} parameters, 1 local epoch), seeds {seeds}: targets {per_seed} "
        f"(the same in-process FedAvg rule, per seed); each chain runs until the target or round {args.horizon}. Time "
        f"bound: rounds x ({args.floor_s:g} s + uplink bytes at {args.up_mbit:g} Mbit/s + downlink bytes at "
        f"{args.down_mbit:g} Mbit/s); 50x needs no more than {need}. Columns with several values give one per seed, "
        "in that order; bytes are means over the seeds.",
        "",
        "| chain | uplink | downlink | rounds to target | best accuracy | uplink bytes / message | downlink bytes / message | time bound | speed-up bound | worst seed |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for index, (_, up, down, optimizer) in enumerate(candidates):
        runs = [rows[seed][index] for seed in seeds]
        bounds = [bound(r) for r in runs]
        speeds = [
            base[seed] / b if (b and base[seed]) else None for seed, b in zip(seeds, bounds, strict=True)
        ]
        worst = "-" if None in speeds else f"{min(s for s in speeds if s is not None):.1f}x"
        lines.append(
            f"| {runs[0]['name']} | {chain_label(up, server_optimizer=optimizer)} | {downlink_label(down)} | "
            + " / ".join(str(r["hit"] or f"not in {r['ran']}") for r in runs)
            + " | "
            + " / ".join(f"{100 * r['best']:.2f} %" for r in runs)
            + f" | {sum(r['up'] for r in runs) / len(runs):,.0f} | {sum(r['down'] for r in runs) / len(runs):,.0f} | "
            + " / ".join(f"{b:.1f} s" if b else "-" for b in bounds)
            + " | "
            + " / ".join(f"{v:.1f}x" if v else "-" for v in speeds)
            + f" | {worst} |"
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
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2])
    parser.add_argument("--up-mbit", type=float, default=1.0)
    parser.add_argument("--down-mbit", type=float, default=10.0)
    parser.add_argument("--floor-s", type=float, default=0.76, help="seconds of a round when nothing travels")
    parser.add_argument("--only", type=int, help="the first N candidates (a smoke run)")
    parser.add_argument(
        "--match", help="only the candidates whose name contains this (and FedAvg, the reference)"
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file to update (e.g. docs/benchmarks.md)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    targets = {
        seed: in_process_target(args.collaborators, args.rounds, seed, args.hidden) for seed in args.seeds
    }
    print("targets " + ", ".join(f"seed {s}: {100 * t:.2f} %" for s, t in targets.items()), flush=True)
    candidates = CANDIDATES[: args.only] if args.only else CANDIDATES
    if args.match:
        candidates = candidates[:1] + [c for c in candidates[1:] if args.match in c[0]]
    jobs = [(name, up, down, opt, args.collaborators, args.horizon, seed, args.hidden, targets[seed])
            for seed in args.seeds for name, up, down, opt in candidates]  # fmt: skip
    # spawn, not fork: the targets' runs have started torch's threads in this process
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(screen_one, jobs))
    rows = {
        seed: results[i * len(candidates) : (i + 1) * len(candidates)] for i, seed in enumerate(args.seeds)
    }
    for seed, seed_rows in rows.items():
        for row in seed_rows:
            print(
                f"  seed {seed}, {row['name']}: {row['hit'] or 'not reached'} ({row['wall']:.0f} s)",
                flush=True,
            )
    lines = table(candidates, rows, args, targets, time.perf_counter() - start)
    print("\n".join(lines))
    if args.out is not None:
        key, title = "slowlink-screen", "Slow links: chains screened in-process for 50x"
        if args.seeds != [0, 1, 2]:  # another seeds' screen keeps its own section
            key += "-seeds-" + "-".join(map(str, args.seeds))
            title += f", seeds {', '.join(map(str, args.seeds))}"
        replace_section(args.out, key, title, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
