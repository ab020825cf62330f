"""Check: the in-process simulation counts exactly the bytes a real gRPC federation puts on the wire.

    python -m bench.grpc_check [--collaborators 4] [--rounds 5] [--out docs/benchmarks.md]

For each plan below, runs a real federation (`aggregator serve` and N `collaborator join` processes
on loopback) and the same plan and seed through `fedsqueeze.simulation`, then compares round by round the
uplink and downlink wire bytes, the decoder upload bytes, the prepass bytes and the accuracy, and
also each collaborator process's own report (what it sent and received) against the in-process
collaborators'. Any difference fails the check (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import chain_label, downlink_label, replace_section
from .fl_bench import CHAINS, CNN, MLP, Chain

ROOT = Path(__file__).resolve().parents[1]


def bench_chain(prefix: str) -> tuple[str, dict[str, Any], None, dict[str, Any] | None]:
    """(uplink, downlink section, no prepass, server optimizer) of the fl_bench row whose name starts with `prefix`."""
    row: Chain = next(c for c in CHAINS if c.name.startswith(prefix))
    return row.up, {"chain": row.down, "prior": row.prior}, None, row.server_optimizer


# (name, uplink chain, downlink section or chain, prepass section, server optimizer[, model: MLP if absent])
CASES: list[tuple[Any, ...]] = [
    ("default chains (ResFed downlink, stateful)", "ef | topk:0.01 | quantize:4 | entropy", "residual | topk:0.05 | quantize:8 | entropy", None, None),
    ("sparse both ways", "ef | topk:0.002 | quantize:4 | entropy", "residual | topk:0.02 | quantize:4 | entropy", None, None),
    ("aggregator update chain + catch-up downlink (server-side error feedback, lattice)", "ef | sign",
     {"chain": "residual | lattice:0.0005 | entropy", "update_chain": "ef | topk:0.05"}, None, None),
    ("initial-model prior + catch-up downlink, FedAdam on the aggregator", "ef | stc:0.01 | entropy",
     {"chain": "residual | lattice:0.002 | entropy", "update_chain": "ef | topk:0.01", "prior": "initial"}, None,
     {"name": "adam", "lr": 0.03}),
    ("FedAdam with a sparse uplink and a dense catch-up downlink from the prior (fl_bench's G rows)", *bench_chain("G2 ")),
    ("the fewest-bytes recipe, positions coded with contexts (fl_bench's H3)", *bench_chain("H3 ")),
    ("the same recipe on the 75k-parameter CNN (fl_bench's mnist1d-cnn settings: conv weights coded as matrices)", *bench_chain("H3 "), CNN),
    ("AE chunked, shared decoder (prepass, decoder upload and download)", "ae", "identity",
     {"enabled": True, "epochs": 2, "snapshot_every": "batch", "what": "update", "decoder": "shared", "variant": "chunked",
      "chunk": 1024, "latent": 16, "bits": 8, "correction": 0.002, "ae_epochs": 5, "ae_lr": 0.001}, None),
]  # fmt: skip


def make_plan(up: str, down: str | dict[str, Any], prepass: dict[str, Any] | None, server_optimizer: dict[str, Any] | None,
              n: int, per_round: int, rounds: int, seed: int, model: dict[str, Any] = MLP) -> dict[str, Any]:  # fmt: skip
    plan: dict[str, Any] = {
        "task": {"dataset": "mnist1d", "partition": "dirichlet", "alpha": 0.5, "num_shards": 100},
        "model": model,
        "rounds": rounds,
        "seed": seed,
        "collaborators": {
            "min": n,
            "fraction": per_round / n,
            "min_per_round": per_round,
            "join_timeout_s": 300,
        },
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "uplink": {"chain": up},
        "downlink": down if isinstance(down, dict) else {"chain": down},
        "round_timeout_s": 300,
    }
    if server_optimizer:
        plan["aggregation"] = {"server_optimizer": server_optimizer}
    if prepass:
        plan["prepass"] = prepass
    return plan


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_grpc(plan: dict[str, Any], n: int, tmp: Path) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    plan_path, report = tmp / "plan.json", tmp / "report.json"
    plan_path.write_text(json.dumps(plan))
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    t0 = time.perf_counter()
    agg = subprocess.Popen([py, "-m", "fedsqueeze.aggregator", "serve", "--port", str(port), "--host", "127.0.0.1", "--plan", str(plan_path),
                            "--report", str(report)], stdout=open(tmp / "agg.log", "w"), stderr=subprocess.STDOUT, env=env)  # fmt: skip
    collabs = [
        subprocess.Popen(
            [
                py,
                "-m",
                "fedsqueeze.collaborator",
                "join",
                "--threads",
                "1",
                "--server",
                f"127.0.0.1:{port}",
                "--no-progress",
                "--name",
                f"c{i}",
                "--report",
                str(tmp / f"c{i}.json"),
            ],
            stdout=open(tmp / f"c{i}.log", "w"),
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        for i in range(n)
    ]
    try:
        rc = agg.wait(timeout=900)
        for c in collabs:
            c.wait(timeout=60)
    finally:
        for p in [agg, *collabs]:
            if p.poll() is None:
                p.kill()
                p.wait()
    if rc != 0:
        raise RuntimeError(f"aggregator exited {rc}: {(tmp / 'agg.log').read_text()[-2000:]}")
    return (
        json.loads(report.read_text()),
        [json.loads((tmp / f"c{i}.json").read_text()) for i in range(n)],
        time.perf_counter() - t0,
    )


def compare(name: str, plan_json: dict[str, Any], n: int) -> tuple[bool, list[str], dict[str, Any]]:
    from fedsqueeze.plan import Plan
    from fedsqueeze.simulation import run_plan

    with tempfile.TemporaryDirectory() as d:
        grpc_report, collab_reports, grpc_s = run_grpc(plan_json, n, Path(d))
    sim = run_plan(Plan.from_json(plan_json))
    problems = []
    keys = ("up_raw", "up_wire", "down_raw", "down_wire", "decoder")
    for g, s in zip(grpc_report["rounds"], sim.rounds, strict=False):
        for k in keys:
            if g["bytes"][k] != s["bytes"][k]:
                problems.append(f"round {g['round']} {k}: gRPC {g['bytes'][k]} vs in-process {s['bytes'][k]}")
        if abs(g["accuracy"] - s["accuracy"]) > 1e-9:
            problems.append(
                f"round {g['round']} accuracy: gRPC {g['accuracy']} vs in-process {s['accuracy']}"
            )
    if len(grpc_report["rounds"]) != len(sim.rounds):
        problems.append(f"rounds: gRPC {len(grpc_report['rounds'])} vs in-process {len(sim.rounds)}")
    for k in keys:
        if grpc_report["prepass_bytes"][k] != sim.prepass_bytes[k]:
            problems.append(
                f"prepass {k}: gRPC {grpc_report['prepass_bytes'][k]} vs in-process {sim.prepass_bytes[k]}"
            )
    # Each collaborator process's own count of what it sent and received, by shard (= join order).
    # ids are c<join index>-<random>
    by_index = {c["collaborator_id"].split("-")[0]: c for c in collab_reports}
    for c in sim.collaborators:
        real = by_index.get(c.id.split("-")[0])
        if real is None:
            problems.append(f"no gRPC collaborator report for {c.id}")
            continue
        got = [(r["round"], r["up_wire"], r["down_wire"]) for r in real["rounds"]]
        want = [(r["round"], r["up_wire"], r["down_wire"]) for r in c.sent]
        if got != want:
            problems.append(f"collaborator {c.id[:5]}: gRPC {got} vs in-process {want}")
    totals = {
        k: sum(r["bytes"][k] for r in grpc_report["rounds"]) + grpc_report["prepass_bytes"][k] for k in keys
    }
    sim_totals = {k: sum(r["bytes"][k] for r in sim.rounds) + sim.prepass_bytes[k] for k in keys}
    info = {
        "grpc": totals,
        "sim": sim_totals,
        "grpc_s": grpc_s,
        "sim_s": sim.seconds,
        "rounds": len(sim.rounds),
    }
    return not problems, problems, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--collaborators", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=len(CASES), help="run the first N cases")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    lines = [
        f"Command: `python -m bench.grpc_check{' ' + ' '.join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`. "
        f"Each plan runs twice with seed {args.seed}: a real federation (`aggregator serve` + {args.collaborators} `collaborator join` "
        f"processes on loopback, {args.per_round} per round, {args.rounds} rounds, MNIST-1D Dirichlet 0.5 shards of 100, the benchmark's "
        "66k-parameter MLP unless the plan names the CNN) and the in-process simulation the benchmarks use. Compared exactly: every round's uplink/downlink "
        "raw and wire bytes and decoder bytes, the prepass bytes, the accuracy, and each collaborator process's own report of "
        "what it sent and received. Wire bytes = serialized `Payload` messages (gRPC/HTTP2 framing not included, as in the run report).",
        "",
        "| plan | uplink | downlink | rounds | uplink wire (gRPC) | uplink wire (in-process) | downlink wire (gRPC) | downlink wire (in-process) | decoder bytes (gRPC / in-process) | result |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    all_ok = True
    for name, up, down, prepass, server_optimizer, *model in CASES[: args.cases]:
        plan = make_plan(
            up,
            down,
            prepass,
            server_optimizer,
            args.collaborators,
            args.per_round,
            args.rounds,
            args.seed,
            *model,
        )
        ok, problems, info = compare(name, plan, args.collaborators)
        all_ok &= ok
        g, s = info["grpc"], info["sim"]
        verdict = "**equal**" if ok else f"DIFFERENT: {'; '.join(problems[:3])}"
        print(
            f"{name}: {'OK' if ok else 'MISMATCH'} (gRPC {info['grpc_s']:.0f} s, in-process {info['sim_s']:.1f} s)"
        )
        for p in problems[:10]:
            print("   ", p)
        lines.append(
            f"| {name} | {chain_label(up, server_optimizer=server_optimizer)} | {downlink_label(down)} | {info['rounds']} | {g['up_wire']:,} | {s['up_wire']:,} | {g['down_wire']:,} | {s['down_wire']:,} | "
            f"{g['decoder']:,} / {s['decoder']:,} | {verdict} |"
        )
    lines += ["", f"Result: {'all byte counts equal' if all_ok else 'MISMATCH (see table)'}."]
    replace_section(Path(args.out), "grpc-check", "In-process simulation vs real gRPC: byte counts", lines)
    print("\n".join(lines))
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
