"""Checkpoint size and time with many members on a stateful downlink.

    python -m bench.checkpoint [--members 10,100] [--fractions 1.0,0.1] [--rounds 5] [--out docs/benchmarks.md]

The slow-link plan (`fedsqueeze/plans/slow-link.json`: the 1.1M-parameter MLP, downlink
`residual | lattice:0.003 | entropy` primed with the initial model) on the aggregator's `Links`,
without gRPC or training: each round a `fraction` of the members is selected and handed the
drifting global model, as the federation does, then the checkpoint is written
(`Links.states` + `checkpoint.save`) and read back (`checkpoint.load` + `Links.restore`) in a
temporary state directory.

Every member's downlink state holds a model-sized residual history. Members that had the same
downloads hold equal states, which the checkpoint stores once; "one per member" is the size of
storing every member's pair (checkpoint format 2).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fedsqueeze.aggregator import checkpoint
from fedsqueeze.aggregator.links import Links
from fedsqueeze.chains import LinkChains
from fedsqueeze.metrics import Metrics
from fedsqueeze.models import build_model, get_flat, model_layout
from fedsqueeze.plan import Plan

from .common import int_list, md_code, replace_section
from .slowlink import MNIST1D_SHAPE, SLOW_LINK_PLAN


def measure(members: int, fraction: float, rounds: int) -> dict[str, float]:
    plan = Plan.from_json(SLOW_LINK_PLAN)
    length, classes = MNIST1D_SHAPE
    model = build_model(plan.model.name, (length,), classes, plan.model.args, plan.seed)
    layout, initial = model_layout(model), get_flat(model)
    chains = LinkChains.from_plan(plan)
    links = Links(chains, layout, initial, Metrics("aggregator"))
    ids = [f"m{i}" for i in range(members)]
    for member in ids:
        links.add(member)
    rng = np.random.default_rng(0)
    global_model = initial
    for round_number in range(1, rounds + 1):
        global_model = global_model + 1e-3 * rng.standard_normal(layout.numel).astype(np.float32)
        chosen = rng.choice(members, max(1, round(fraction * members)), replace=False)
        for i in sorted(chosen):
            links.encode_download(ids[i], round_number, global_model).commit()
    membership = {"members": [{"id": m, "active": True} for m in ids], "joined": members}
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        states = links.states(ids)
        ckpt = checkpoint.Checkpoint(rounds, plan.sha256, global_model, states, membership)
        path = checkpoint.save(Path(folder), ckpt, layout)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = checkpoint.load(Path(folder), plan.sha256, layout)
        assert loaded is not None
        Links(chains, layout, initial, Metrics("aggregator")).restore(loaded.states)
        read_s = time.perf_counter() - t0
        size = path.stat().st_size
    per_member = sum(len(up) + len(down) for up, down in states.values()) + layout.raw_bytes
    distinct = len({id(down) for _, down in states.values()})
    return {"members": members, "fraction": fraction, "distinct": distinct, "size": size,
            "per_member": per_member, "write_s": write_s, "read_s": read_s}  # fmt: skip


def table(rows: list[dict[str, float]], rounds: int) -> list[str]:
    lines = [
        f"The slow-link plan's 1.1M-parameter MLP and downlink {md_code('residual | lattice:0.003 | entropy')}, "
        f"{rounds} rounds handed out, then the checkpoint written and read back:",
        "",
        "| members | fraction per round | distinct downlink states | checkpoint | one per member | write | read + restore |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['members']} | {r['fraction']:g} | {r['distinct']} | {r['size'] / 1e6:,.1f} MB | "
            f"{r['per_member'] / 1e6:,.1f} MB | {r['write_s']:.2f} s | {r['read_s']:.2f} s |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int_list, default=[10, 100])
    parser.add_argument("--fractions", default="1.0,0.1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = [measure(n, f, args.rounds) for n in args.members for f in fractions]
    lines = table(rows, args.rounds)
    print("\n".join(lines))
    if args.out:
        members = ",".join(map(str, args.members))
        command = f"python -m bench.checkpoint --members {members} --fractions {args.fractions} --rounds {args.rounds}"
        replace_section(args.out, "checkpoint", "Checkpoints with many members", [f"`{command}`", "", *lines])


if __name__ == "__main__":
    main()
