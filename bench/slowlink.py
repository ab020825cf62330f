"""Time to accuracy on slow links: aggregator and collaborators in separate network namespaces.

    sudo python -m bench.slowlink [--up-mbit 1] [--down-mbit 10] [--collaborators 4] [--rounds 20] [--out docs/benchmarks.md]
                                  [--reuse]

With `--reuse`, a run whose plan and links match one in runs/slowlink/ is read back instead of run again
(its report, with the round durations measured then); the table says how many rows came from there.

Needs root (`ip netns`, `tc`). Topology, all on this machine and private to it: one namespace for the
aggregator, one per collaborator; collaborator i is joined to the aggregator by its own veth pair,
10.200.i.2 <-> 10.200.i.1 (/30). `tc qdisc ... tbf` shapes each collaborator's egress to the uplink
rate and the aggregator's egress on each pair to the downlink rate. The aggregator (`aggregator serve`)
and collaborators (`collaborator join`) are the real processes, run with `ip netns exec`. The
namespaces (and with them the veths) are deleted at the end, also on error or Ctrl-C.

Target: the same plan with identity chains, simulated in-process first (`fedsqueeze.simulation`): the mean
accuracy of its last 3 rounds minus 1 pp. Time to target: the sum of the aggregator's round durations
(`seconds` in the run report: downlink transfer, decoding, training, encoding, uplink transfer, decoding,
aggregation, evaluation) up to the first round at or above the target, plus the prepass when there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fedsqueeze

from .common import chain_label, downlink_label, int_list, replace_section
from .fl_bench import ADAM, ADAM_B05, CONTEXT

# bench.fl_bench's H3, the chains with the fewest bytes to target there
RECIPE_UP = f"ef:0.8 | stc:0.005,{CONTEXT} | entropy"
RECIPE_DOWN = f"residual | lattice:0.1,{CONTEXT} | entropy"


# The slow-link recipe, fedsqueeze/plans/slow-link.json (found by bench.slowlink_screen): fewer rounds than
# FedAvg from a denser uplink (STC 2 %), a downlink fine enough to be almost lossless (step 0.003) and a
# gentler FedAdam. Golomb-Rice positions: on this 2-core machine context coding 2 % of 1.1M positions costs
# more CPU time than the 5 kB it saves at 1 Mbit/s.
def context_positions(chain: str) -> str:
    """`chain` with its sparse and lattice stages' positions coded with contexts (codecs/sigmap.py)."""
    stages = [part.strip() for part in chain.split("|")]
    return " | ".join(
        f"{st},{CONTEXT}" if st.startswith(("stc:", "topk:", "lattice:")) else st for st in stages
    )


SLOW_LINK_PLAN = json.loads((Path(fedsqueeze.__file__).parent / "plans" / "slow-link.json").read_text())
SLOW_UP: str = SLOW_LINK_PLAN["uplink"]["chain"]
SLOW_DOWN: dict[str, Any] = SLOW_LINK_PLAN["downlink"]
ADAM_SLOW: dict[str, Any] = SLOW_LINK_PLAN["aggregation"]["server_optimizer"]
# (name, uplink chain, downlink chain or spec, plan sections merged on top)
CHAINS: list[tuple[Any, ...]] = [
    ("FedAvg (identity)", "identity", "identity"),
    ("fp16", "fp16", "fp16"),
    ("sign + EF / fp16", "ef | sign", "fp16"),
    ("default chains (ResFed)", "ef | topk:0.01 | quantize:4 | entropy", "residual | topk:0.05 | quantize:8 | entropy"),
    ("top-k 0.2% q4 / res top-k 5% q4", "ef | topk:0.002 | quantize:4 | entropy", "residual | topk:0.05 | quantize:4 | entropy"),
    # the aggregator compresses its own update (downlink.update_chain); collaborators catch up on what moved
    ("sign + EF / catch-up, update top-k 5%", "ef | sign", {"chain": "residual | lattice:0.0005 | entropy", "update_chain": "ef | topk:0.05"}),
    ("top-k 1% q4 / catch-up, update top-k 1%", "ef | topk:0.01 | quantize:4 | entropy",
     {"chain": "residual | lattice:0.0005 | entropy", "update_chain": "ef | topk:0.01"}),
    # bench.fl_bench's recipe (H3) and its peers: server-side Adam, the initial model as the downlink's prior
    ("FedAdam (identity)", "identity", "identity", {"aggregation": {"server_optimizer": ADAM}}),
    ("sign + EF + FedAdam / fp16", "ef | sign", "fp16", {"aggregation": {"server_optimizer": ADAM}}),
    ("recipe: STC 0.5% + FedAdam / dense catch-up", RECIPE_UP, {"chain": RECIPE_DOWN, "prior": "initial"},
     {"aggregation": {"server_optimizer": ADAM_B05}}),
    ("slow-link recipe: STC 2% + FedAdam lr 0.01 / lattice 0.003", SLOW_UP, SLOW_DOWN,
     {"aggregation": {"server_optimizer": ADAM_SLOW}}),
    ("slow-link recipe, context-coded positions", context_positions(SLOW_UP),
     {**SLOW_DOWN, "chain": context_positions(SLOW_DOWN["chain"])}, {"aggregation": {"server_optimizer": ADAM_SLOW}}),
]  # fmt: skip


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


class Topology:
    def __init__(self, n: int, up_mbit: float, down_mbit: float) -> None:
        self.tag = f"{os.getpid() % 100000}"
        self.agg = f"fsqb{self.tag}-agg"
        self.collabs = [f"fsqb{self.tag}-c{i}" for i in range(n)]
        self.n, self.up, self.down = n, up_mbit, down_mbit

    def __enter__(self) -> Topology:
        try:
            sh("ip", "netns", "add", self.agg)
            sh("ip", "netns", "exec", self.agg, "ip", "link", "set", "lo", "up")
            for i, ns in enumerate(self.collabs):
                a, c = f"vb{self.tag}a{i}", f"vb{self.tag}c{i}"
                sh("ip", "netns", "add", ns)
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                sh("ip", "link", "add", a, "type", "veth", "peer", "name", c)
                sh("ip", "link", "set", a, "netns", self.agg)
                sh("ip", "link", "set", c, "netns", ns)
                sh("ip", "netns", "exec", self.agg, "ip", "addr", "add", f"10.200.{i}.1/30", "dev", a)
                sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.200.{i}.2/30", "dev", c)
                sh("ip", "netns", "exec", self.agg, "ip", "link", "set", a, "up")
                sh("ip", "netns", "exec", ns, "ip", "link", "set", c, "up")
                # Token bucket: the rate, a burst of ~10 ms at that rate (min 16 kbit), 200 ms of queue.
                for where, dev, rate in ((ns, c, self.up), (self.agg, a, self.down)):
                    burst = max(16, int(rate * 1000 * 0.01))
                    sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate}mbit",
                       "burst", f"{burst}kbit", "latency", "200ms")  # fmt: skip
        except BaseException:
            self.cleanup()
            raise
        return self

    def server(self, i: int) -> str:
        return f"10.200.{i}.1"

    def cleanup(self) -> None:
        for ns in [self.agg, *self.collabs]:
            sh("ip", "netns", "del", ns, check=False)

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


CACHE = Path("runs/slowlink")
HIDDEN = [384, 128]  # the 66k-parameter MLP of bench.fl_bench
MNIST1D_SHAPE = (40, 10)  # input length, classes


def mlp_parameters(hidden: list[int]) -> int:
    sizes = [MNIST1D_SHAPE[0], *hidden, MNIST1D_SHAPE[1]]
    return sum((a + 1) * b for a, b in zip(sizes, sizes[1:], strict=False))


def make_plan(
    up: str,
    down: str | dict[str, Any],
    n: int,
    rounds: int,
    seed: int,
    extra: dict[str, Any] | None = None,
    hidden: list[int] = HIDDEN,
) -> dict[str, Any]:
    return (extra or {}) | {
        "task": {"dataset": "mnist1d", "partition": "dirichlet", "alpha": 0.5},
        "model": {"name": "mlp", "args": {"hidden": hidden}},
        "rounds": rounds,
        "seed": seed,
        "collaborators": {"min": n, "fraction": 1.0, "join_timeout_s": 300},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "uplink": {"chain": up},
        "downlink": down if isinstance(down, dict) else {"chain": down},
        "round_timeout_s": 600,
    }


def in_process_target(n: int, rounds: int, seed: int, hidden: list[int]) -> float:
    """The target: the plan with identity chains in-process, mean accuracy of its last 3 rounds minus 1 pp."""
    from fedsqueeze.plan import Plan
    from fedsqueeze.simulation import run_plan

    ref = run_plan(Plan.from_json(make_plan("identity", "identity", n, rounds, seed, hidden=hidden)))
    accs = [r["accuracy"] for r in ref.rounds]
    return float(sum(accs[-3:]) / 3 - 0.01)


def run_federation(topo: Topology, plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    plan_path, report = tmp / "plan.json", tmp / "report.json"
    plan_path.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    agg = subprocess.Popen(["ip", "netns", "exec", topo.agg, py, "-m", "fedsqueeze.aggregator", "serve", "--host", "0.0.0.0", "--port", "50051",
                            "--plan", str(plan_path), "--report", str(report)], stdout=open(tmp / "agg.log", "w"), stderr=subprocess.STDOUT, env=env)  # fmt: skip
    collabs = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                py,
                "-m",
                "fedsqueeze.collaborator",
                "join",
                "--threads",
                "1",
                "--server",
                f"{topo.server(i)}:50051",
                "--no-progress",
                "--connect-timeout",
                "120",
            ],
            stdout=open(tmp / f"c{i}.log", "w"),
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        for i, ns in enumerate(topo.collabs)
    ]
    try:
        rc = agg.wait(timeout=1800)
        for c in collabs:
            c.wait(timeout=60)
    finally:
        for p in [agg, *collabs]:
            if p.poll() is None:
                p.kill()
                p.wait()
    if rc != 0:
        raise RuntimeError(f"aggregator exited {rc}: {(tmp / 'agg.log').read_text()[-2000:]}")
    return dict(json.loads(report.read_text()))


def cache_path(plan: dict[str, Any], topo: Topology) -> Path:
    """Where a run of `plan` over these links is kept: the plan, the rates and the collaborators' count."""
    key = json.dumps([plan, topo.n, topo.up, topo.down], sort_keys=True)
    return CACHE / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def section(hidden: list[int], seed: int, up_mbit: float) -> tuple[str, str]:
    """(key, title) of a run's section in docs/benchmarks.md: one per model size and seed."""
    key = "slowlink" if hidden == HIDDEN else f"slowlink-mlp-{'-'.join(map(str, hidden))}"
    title = f"Time to accuracy on slow links ({up_mbit:g} Mbit/s uplink)"
    if hidden != HIDDEN:
        title += f", a {mlp_parameters(hidden) / 1e6:.1f}M-parameter MLP"
    if seed != 0:
        key, title = f"{key}-seed{seed}", f"{title}, seed {seed}"
    return key, title


def run_or_reuse(topo: Topology, plan: dict[str, Any], reuse: bool) -> tuple[dict[str, Any], float, bool]:
    """(the run's report, its wall seconds, whether it came from the cache)."""
    path = cache_path(plan, topo)
    if reuse and path.exists():
        kept = json.loads(path.read_text())
        return kept["report"], kept["wall"], True
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        report = run_federation(topo, plan, Path(d))
        wall = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"plan": plan, "report": report, "wall": wall}))
    return report, wall, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--up-mbit", type=float, default=1.0)
    parser.add_argument("--down-mbit", type=float, default=10.0)
    parser.add_argument("--collaborators", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--horizon",
        type=int,
        help="rounds for the compressed chains (default: --rounds); FedAvg runs --rounds",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hidden",
        type=int_list,
        default=HIDDEN,
        help="the MLP's hidden sizes (default 384,128: 66k parameters); another size gets its own section",
    )
    parser.add_argument("--chains", type=int, default=len(CHAINS), help="the first N chains")
    parser.add_argument("--only", help="comma-separated row numbers (0 = FedAvg, always run)")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument(
        "--reuse", action="store_true", help=f"read back runs kept in {CACHE}/ instead of running them again"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.slowlink needs root (ip netns, tc)", file=sys.stderr)
        return 2
    target = in_process_target(args.collaborators, args.rounds, args.seed, args.hidden)
    print(f"target {100 * target:.2f} % (in-process FedAvg, last 3 of {args.rounds} rounds, minus 1 pp)")
    chosen = CHAINS[: args.chains]
    if args.only:
        chosen = [CHAINS[0], *(CHAINS[int(i)] for i in args.only.split(",") if int(i) != 0)]
    rows = []
    reused = 0
    with Topology(args.collaborators, args.up_mbit, args.down_mbit) as topo:
        for name, up, down, *extra in chosen:
            rounds = args.rounds if name == CHAINS[0][0] else max(args.rounds, args.horizon or 0)
            plan = make_plan(
                up, down, args.collaborators, rounds, args.seed, extra[0] if extra else None, args.hidden
            )
            rep, wall, kept = run_or_reuse(topo, plan, args.reuse)
            reused += kept
            pre = rep.get("prepass", {})
            elapsed, hit = 0.0, None
            for r in rep["rounds"]:
                elapsed += r["seconds"]
                if r["accuracy"] >= target:
                    hit = (r["round"], elapsed)
                    break
            n = len(rep["rounds"])
            per_round = sum(r["seconds"] for r in rep["rounds"]) / n
            up_msg = sum(r["bytes"]["up_wire"] for r in rep["rounds"]) / max(
                1, sum(r["participants"] for r in rep["rounds"])
            )
            down_msg = sum(r["bytes"]["down_wire"] for r in rep["rounds"]) / max(
                1, sum(r["participants"] for r in rep["rounds"])
            )
            row = {"name": name, "up": up, "down": down, "hit": hit, "per_round": per_round, "final": rep["rounds"][-1]["accuracy"],
                   "up_msg": up_msg, "down_msg": down_msg, "wall": wall, "prepass": bool(pre), "rounds": n,
                   "server_optimizer": plan.get("aggregation", {}).get("server_optimizer")}  # fmt: skip
            rows.append(row)
            print(
                f"{name}: {f'round {hit[0]}, {hit[1]:.1f} s' if hit else 'not reached'}; {per_round:.2f} s/round; final {100 * row['final']:.2f} %; wall {wall:.0f} s"
                + (" (kept run)" if kept else "")
            )
    cleanup_ok = not any(ns.startswith(f"fsqb{topo.tag}-") for ns in sh("ip", "netns", "list").stdout.split())
    base = rows[0]["hit"][1] if rows and rows[0]["hit"] else None
    lines = [
        f"Command: `sudo .venv/bin/python -m bench.slowlink{' ' + ' '.join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`. "
        f"Aggregator and {args.collaborators} collaborators, each in its own network namespace, one veth pair per collaborator "
        f"(10.200.i.2 <-> 10.200.i.1), `tc tbf`: **{args.up_mbit:g} Mbit/s uplink** per collaborator, {args.down_mbit:g} Mbit/s downlink. "
        f"Real `aggregator serve` / `collaborator join` processes. Plan: MNIST-1D, Dirichlet 0.5 over {args.collaborators} shards, the "
        f"MLP with hidden layers {args.hidden} ({mlp_parameters(args.hidden):,} parameters), all {args.collaborators} collaborators every round, 1 local epoch, seed {args.seed}; FedAvg runs {args.rounds} rounds, "
        f"the other chains {max(args.rounds, args.horizon or 0)}. "
        f"Target {100 * target:.2f} % (in-process FedAvg, mean of the last 3 rounds, minus 1 pp). Time to target: the aggregator's "
        "round durations summed up to the first round at target (transfers, codec time, training, aggregation, evaluation; "
        "process start-up and joining excluded). Namespaces removed afterwards: "
        + ("yes." if cleanup_ok else "NO.")
        + (
            f" {reused} of {len(rows)} rows are runs kept from an earlier invocation (`--reuse`), measured the same way."
            if reused
            else ""
        ),
        "",
        "| chain | uplink | downlink | uplink bytes / message | downlink bytes / message | s / round | rounds to target | time to target | speed-up vs FedAvg | final accuracy |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        hit = r["hit"]
        speed = f"{base / hit[1]:.1f}x" if (hit and base) else "-"
        lines.append(
            f"| {r['name']} | {chain_label(r['up'], server_optimizer=r['server_optimizer'])} | {downlink_label(r['down'])} | {r['up_msg']:,.0f} | {r['down_msg']:,.0f} | {r['per_round']:.2f} | "
            f"{hit[0] if hit else 'not reached'} | {f'{hit[1]:.1f} s' if hit else '-'} | {speed} | {100 * r['final']:.2f} % |"
        )
    if rows:
        fastest = min(rows, key=lambda r: r["per_round"])
        lines += [
            "",
            f"Ceiling: FedAvg's round takes {rows[0]['per_round']:.2f} s and the fastest chain's ({fastest['name']}) "
            f"{fastest['per_round']:.2f} s, the time left when almost nothing travels (training, codec time, aggregation, "
            f"evaluation, round trips). No chain can be more than {rows[0]['per_round'] / fastest['per_round']:.1f}x faster "
            "to the target than FedAvg here unless it needs fewer rounds than FedAvg does. For 50x at equal rounds, "
            f"FedAvg's uplink alone would have to take {50 * fastest['per_round']:.1f} s a round: fp32 messages of about "
            f"{50 * fastest['per_round'] * args.up_mbit * 1e6 / 8 / 1e6:.1f} MB (a model of "
            f"{50 * fastest['per_round'] * args.up_mbit * 1e6 / 8 / 4 / 1e6:.1f} M parameters) at this uplink, with training "
            "no slower than here.",
        ]
    replace_section(Path(args.out), *section(args.hidden, args.seed, args.up_mbit), lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
