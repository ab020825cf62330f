"""Seed 003's experiments on a stand-in: magnitude pruning of messages both ways (its Table I), and
quantization-aware training against post-hoc quantization at 1, 4 and 8 bits (its Fig. 3 / Table II).

    python -m bench.seed003 [--rounds 100] [--seeds 0] [--jobs 2] [--reuse] [--out docs/benchmarks.md]

With `--reuse`, a run whose plan matches one kept in runs/seed003/ is read back instead of run again.

Stand-in for its CIFAR-10 ResNet-18 protocol (100 clients, 10 % per round, 1 local epoch, Dirichlet
alpha 0.1): the MNIST-1D 1-D CNN of `bench.fl_bench` (74,698 parameters, 50,000 generated samples,
400 per collaborator), the same federation. As in the paper, messages are models, not updates
(`uplink.target: "weights"`), and both directions are compressed the same way:
- pruning: `prune:rate | zstd` (the paper zips its pruned models);
- post-hoc quantization: `quantize:b,granularity=layer,grid=minmax | zstd` (b = 4, 8) or `sign | zstd`
  (1 bit), applied to trained float weights;
- QAT: the same chains, with `training.qat` set to the quantizer, so the weights are trained through it
  (BinaryConnect for 1 bit) and each message is exactly the trained model;
- "float downlink" rows: the paper's QAT set-up, quantized models up and the aggregated float model
  down (`downlink.chain: identity`), for QAT and, beside it, post-hoc quantization.
Accuracy is the mean over the last 5 rounds; message sizes are mean wire bytes per message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import int_list, md_code, replace_section, run_or_read
from bench.fl_bench import CNN, MNIST1D_SAMPLES, TRAINING, fmt_bytes, smoothed_final

PRUNE_RATES = (0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
QUANTIZERS = {
    1: "sign",
    4: "quantize:4,granularity=layer,grid=minmax",
    8: "quantize:8,granularity=layer,grid=minmax",
}
# Seed 003's Table I (CIFAR-10, ResNet-18, 100 clients, alpha 0.1): accuracy %, message MB (44.7 MB unpruned)
PAPER_TABLE_I = {0.0: (84.43, 44.7), 0.1: (85.96, 38.1), 0.3: (85.03, 31.1), 0.5: (83.85, 23.0), 0.7: (82.25, 14.5),
                 0.9: (76.77, 4.9), 0.95: (69.14, 2.5), 0.99: (0.10, 0.5)}  # fmt: skip
# Its Table II (QAT, CIFAR-10 IID, 1 local epoch, a 2.97 MB model): accuracy %, message MB
PAPER_QAT = {8: (78.80, 0.75), 4: (79.74, 0.38), 1: (48.93, 0.10)}
CACHE = Path("runs/seed003")
FLOAT_DOWN = "identity"  # the paper's QAT downlink: the aggregated model as float32


@dataclass(frozen=True)
class Row:
    name: str
    chain: str  # the uplink's, and the downlink's unless `downlink` is set
    qat: str = ""
    downlink: str = ""  # "" = the uplink's chain
    group: str = "pruning"
    paper: tuple[float, float] | None = (
        None  # seed 003's (accuracy %, message MB) for the same row, if it has one
    )

    @property
    def down(self) -> str:
        return self.downlink or self.chain


def rows() -> list[Row]:
    out = [Row("FedAvg (no compression)", "identity", group="baseline", paper=PAPER_TABLE_I[0.0])]
    out += [
        Row(f"{rate:.0%} pruning", f"prune:{rate} | zstd", paper=PAPER_TABLE_I[rate]) for rate in PRUNE_RATES
    ]
    for bits, quantizer in QUANTIZERS.items():
        out.append(Row(f"{bits}-bit post-hoc", f"{quantizer} | zstd", group="quantization"))
        out.append(Row(f"{bits}-bit QAT", f"{quantizer} | zstd", qat=quantizer, group="quantization",
                       paper=PAPER_QAT[bits]))  # fmt: skip
    for bits, quantizer in QUANTIZERS.items():
        out.append(Row(f"{bits}-bit post-hoc, float downlink", f"{quantizer} | zstd", group="float downlink",
                       downlink=FLOAT_DOWN))  # fmt: skip
        out.append(Row(f"{bits}-bit QAT, float downlink", f"{quantizer} | zstd", qat=quantizer,
                       group="float downlink", downlink=FLOAT_DOWN, paper=PAPER_QAT[bits]))  # fmt: skip
    return out


def plan_json(row: Row, seed: int, rounds: int) -> dict[str, Any]:
    return {
        "task": {
            "dataset": "mnist1d",
            "partition": "dirichlet",
            "alpha": 0.1,
            "num_samples": MNIST1D_SAMPLES,
        },
        "model": CNN,
        "rounds": rounds,
        "seed": seed,
        "collaborators": {"min": 100, "fraction": 0.1, "min_per_round": 10},
        "training": {**TRAINING, "qat": row.qat},
        "uplink": {"chain": row.chain, "target": "weights"},
        "downlink": {"chain": row.down},
        "aggregation": {"norm_bound": None},
    }


Job = tuple[Row, int, int]


def cache_path(job: Job) -> Path:
    """Where a run is kept: keyed by its plan, so a row renamed or reordered is still found."""
    row, seed, rounds = job
    digest = hashlib.sha256(json.dumps(plan_json(row, seed, rounds), sort_keys=True).encode()).hexdigest()
    return CACHE / f"s{seed}-{digest[:16]}.json"


def run_one(job: Job) -> dict[str, Any]:
    import torch

    from fedsqueeze.plan import Plan
    from fedsqueeze.simulation import run_plan

    torch.set_num_threads(1)
    row, seed, rounds = job
    res = run_plan(Plan.from_json(plan_json(row, seed, rounds)))
    rs = res.rounds
    messages_up = sum(r["participants"] for r in rs)
    out = {
        "row": row.name,
        "seed": seed,
        "accuracy": smoothed_final(rs, 5),
        "up_wire": sum(r["bytes"]["up_wire"] for r in rs) / max(messages_up, 1),
        "down_wire": sum(r["bytes"]["down_wire"] for r in rs) / max(messages_up, 1),
        "raw": rs[0]["bytes"]["up_raw"] / max(rs[0]["participants"], 1),
        "seconds": res.seconds,
    }
    path = cache_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def table(results: list[dict[str, Any]], args: argparse.Namespace, wall: float, cached: int) -> list[str]:
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    raw = results[0]["raw"]
    lines = [
        f"Command: `python -m bench.seed003 --rounds {args.rounds} --seeds {','.join(map(str, args.seeds))}` "
        f"({wall / 60:.1f} min wall, {args.jobs} processes; {cached} of {len(results)} runs kept from an earlier "
        f"invocation, `--reuse`; the runs themselves {sum(r['seconds'] for r in results) / 60:.1f} min). Stand-in for seed 003's Table I protocol: the MNIST-1D "
        "1-D CNN (74,698 parameters, 299 kB as fp32), 100 collaborators, 10 per round, 1 local epoch (batch 32, SGD "
        f"lr 0.05, momentum 0.9), Dirichlet alpha 0.1, {args.rounds} rounds. Messages are models (`uplink.target: "
        "weights`), compressed the same way in both directions except in the float-downlink rows. Accuracy: mean of the last 5 rounds (± over seeds); "
        "message: mean wire bytes per message. The paper's columns: its Table I (CIFAR-10, ResNet-18 of 44.7 MB, the same non-IID protocol) for pruning, "
        "its Table II (QAT, CIFAR-10 IID, a 2.97 MB model) for QAT.",
        "",
        "| row | uplink chain | downlink | QAT | accuracy | uplink message | downlink message | vs fp32 | paper: accuracy | paper: message |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows():
        runs = by_row.get(row.name)
        if not runs:
            continue
        accs = [r["accuracy"] * 100 for r in runs]
        acc = (
            f"{statistics.mean(accs):.2f}"
            + (f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else "")
            + " %"
        )
        up = statistics.mean(r["up_wire"] for r in runs)
        down = statistics.mean(r["down_wire"] for r in runs)
        paper_cols = f"{row.paper[0]:.2f} % | {row.paper[1]} MB" if row.paper else "- | -"
        down_cell = "same" if row.down == row.chain else md_code(row.down)
        lines.append(f"| {row.name} | {md_code(row.chain)} | {down_cell} | {md_code(row.qat) if row.qat else '-'} | {acc} | {fmt_bytes(up)} | "
                     f"{fmt_bytes(down)} | {raw / up:.1f}x | {paper_cols} |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seeds", type=int_list, default=[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated substrings of row names")
    parser.add_argument("--reuse", action="store_true", help=f"read back runs kept in {CACHE}/")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file to update (e.g. docs/benchmarks.md)"
    )
    args = parser.parse_args(argv)
    wanted = [w for w in args.only.split(",") if w]
    jobs = [(row, seed, args.rounds) for row in rows() for seed in args.seeds
            if not wanted or row.group == "baseline" or any(w in row.name for w in wanted)]  # fmt: skip
    start = time.perf_counter()
    results, kept = run_or_read(jobs, cache_path, run_one, args.reuse, args.jobs)
    results = [
        {**out, "row": job[0].name} for job, out in zip(jobs, results, strict=True)
    ]  # today's row names
    lines = table(results, args, time.perf_counter() - start, kept)
    print("\n".join(lines))
    if args.out is not None:
        replace_section(
            args.out,
            "seed003",
            "Seed 003: pruning and quantization-aware training (Table I, stand-in)",
            lines,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
