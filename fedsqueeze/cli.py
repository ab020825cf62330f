"""`fedsqueeze`: project-level commands.

fedsqueeze demo [--collaborators 4] [--rounds 20] [--uplink CHAIN] [--downlink CHAIN] [--downlink-update CHAIN]
                [--downlink-prior initial] [--server-optimizer adam:0.03]
fedsqueeze codecs          # list the registered codecs
fedsqueeze health --server HOST:PORT   # exit 0 when the aggregator's gRPC health service says SERVING
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedsqueeze.console import die
from fedsqueeze.plan import Plan, PlanError


def _builtin_plan(name: str) -> Plan:
    return Plan.load(Path(__file__).parent / "plans" / f"{name}.json")


def _demo_plan(args: argparse.Namespace) -> Plan:
    if args.plan:
        plan = Plan.load(args.plan)
    elif getattr(args, "ae", False):
        plan = _builtin_plan("ae-paper" if getattr(args, "paper", False) else "ae")
    else:
        plan = Plan()
    plan.rounds = args.rounds if args.rounds is not None else plan.rounds
    plan.collaborators.min = args.collaborators
    plan.collaborators.min_per_round = min(plan.collaborators.min_per_round, args.collaborators)
    if args.dataset:
        plan.task.dataset = args.dataset
    if args.model:
        plan.model.name = args.model
    if args.uplink:
        plan.uplink.chain = args.uplink
    if args.downlink:
        plan.downlink.chain = args.downlink
    if getattr(args, "downlink_update", None):
        plan.downlink.update_chain = (
            None if args.downlink_update.strip().lower() in ("none", "null") else args.downlink_update
        )
    if getattr(args, "downlink_prior", None):
        plan.downlink.prior = args.downlink_prior
    if getattr(args, "server_optimizer", None):
        name, _, lr = args.server_optimizer.partition(":")
        plan.aggregation.server_optimizer.name = name.strip()
        if lr:
            try:
                plan.aggregation.server_optimizer.lr = float(lr)
            except ValueError:
                raise PlanError(
                    f"--server-optimizer: the learning rate after ':' must be a number, got {lr!r}"
                ) from None
    plan.round_timeout_s = min(plan.round_timeout_s, 120.0)
    plan.collaborators.join_timeout_s = min(plan.collaborators.join_timeout_s, 120.0)
    plan.validate()
    return plan


def run_demo(args: argparse.Namespace) -> int:
    """Start a real aggregator and N collaborator processes on loopback; stream the round table."""
    plan = _demo_plan(args)
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    plan_path, report_path = out / "plan.json", out / "report.json"
    plan_path.write_text(json.dumps(plan.to_json(), indent=2))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(
        f"fedsqueeze demo: {args.collaborators} collaborator processes, {plan.rounds} rounds, run folder {out}",
        flush=True,
    )
    agg = subprocess.Popen(
        [sys.executable, "-m", "fedsqueeze.aggregator", "serve", "--port", "0", "--host", "127.0.0.1",
         "--plan", str(plan_path), "--report", str(report_path)],
        stdout=subprocess.PIPE, stderr=open(out / "aggregator.log", "w"), text=True, env=env,
    )  # fmt: skip
    collaborators: list[subprocess.Popen[Any]] = []
    try:
        assert agg.stdout is not None
        for line in agg.stdout:
            line = line.rstrip("\n")
            if line.startswith("report: "):
                continue  # printed last, below
            print(line, flush=True)
            match = re.match(r"aggregator on port (\d+)", line)
            if match and not collaborators:
                port = int(match.group(1))
                for i in range(args.collaborators):
                    log = open(out / f"collaborator-{i}.log", "w")
                    collaborators.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "fedsqueeze.collaborator",
                                "join",
                                "--threads",
                                "1",
                                "--server",
                                f"127.0.0.1:{port}",
                                "--name",
                                f"demo-{i}",
                                "--no-progress",
                                "--report",
                                str(out / f"collaborator-{i}.json"),
                            ],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                        )  # fmt: skip
                    )
        code = agg.wait()
        failed = []
        for i, proc in enumerate(collaborators):
            try:
                if proc.wait(timeout=60) != 0:
                    failed.append(i)
            except subprocess.TimeoutExpired:
                proc.kill()
                failed.append(i)
        if failed:
            print(f"collaborators {failed} failed: see {out}/collaborator-<i>.log", file=sys.stderr)
        if code != 0:
            print(f"the aggregator exited with {code}: see {out / 'aggregator.log'}", file=sys.stderr)
        if code == 0 and report_path.exists() and not args.no_baseline and not _is_uncompressed(plan):
            _add_baseline(plan, report_path)
        print(f"report: {report_path}")
        return 0 if code == 0 and not failed else 1
    finally:
        for proc in [agg, *collaborators]:
            if proc.poll() is None:
                proc.terminate()


def _is_uncompressed(plan: Plan) -> bool:
    from fedsqueeze.chains import LinkChains

    chains = LinkChains.from_plan(plan)
    return (
        str(chains.uplink) == "identity"
        and str(chains.downlink) == "identity"
        and chains.global_update is None
        and not plan.prepass.enabled
    )


def _add_baseline(plan: Plan, report_path: Path) -> None:
    """Run the same plan uncompressed (identity chains, no prepass, same seed and shards) in-process; record it."""
    from fedsqueeze.console import human_bytes
    from fedsqueeze.simulation import run_plan, uncompressed

    print(
        "baseline: the same federation uncompressed (identity codec, same seed and shards), in-process ...",
        flush=True,
    )
    base = run_plan(uncompressed(plan))
    base_accuracy = base.final_accuracy or 0.0
    report = json.loads(report_path.read_text())
    report["baseline_accuracy"] = base_accuracy
    report["baseline"] = {"how": "fedsqueeze.simulation: the Federation in-process, identity chains, same plan (server optimizer "
                          "included) and seed", "accuracy": [r["accuracy"] for r in base.rounds]}  # fmt: skip
    s = report["summary"]
    s["baseline_accuracy"] = base_accuracy
    messages = sum(r["participants"] for r in report["rounds"]) or 1
    s["up_wire_per_message"] = s["up_wire"] / messages
    s["up_ratio_per_message"] = report["model"]["raw_bytes"] / s["up_wire_per_message"]
    from fedsqueeze.report import write_json_atomic

    write_json_atomic(report_path, report)
    acc = s["final_accuracy"]
    opt = plan.aggregation.server_optimizer
    baseline = (
        "FedAvg baseline (same seed)"
        if opt.is_plain
        else f"baseline (same seed, server {opt.name} lr {opt.lr})"
    )
    print(f"accuracy         : {acc:.2%}   uncompressed {baseline}: {base_accuracy:.2%}   "
          f"difference {100 * (acc - base_accuracy):+.2f} pp")  # fmt: skip
    decoders = f"; decoders uploaded: {human_bytes(s['decoder'])}" if s["decoder"] else ""
    print(f"uplink / message : {s['up_wire_per_message']:.1f} wire bytes of {report['model']['raw_bytes']:,} "
          f"({s['up_ratio_per_message']:.0f}x){decoders}")  # fmt: skip


def run_demo_ae(args: argparse.Namespace) -> int:
    args.ae = True
    return run_demo(args)


def list_codecs(args: argparse.Namespace) -> int:
    from fedsqueeze.codecs import registered_codecs

    for codec_id, cls in registered_codecs().items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        print(f"{codec_id:<12} {doc[0] if doc else ''}")
    return 0


def check_health(args: argparse.Namespace) -> int:
    """Ask the gRPC health service; exit 0 when SERVING (for container and orchestrator health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.server) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsqueeze", description="fedsqueeze: compressed federated learning"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a real local federation (aggregator + collaborator processes)")
    demo.add_argument("--collaborators", type=int, default=4)
    demo.add_argument("--rounds", type=int, default=None, help="default: the plan's (20)")
    demo.add_argument("--plan", help="start from this plan instead of the built-in one")
    demo.add_argument(
        "--dataset",
        help="digits or mnist1d (stdlib: with --model transformer and a plan that sets training.local_steps)",
    )
    demo.add_argument("--model", help="mlp, cnn or transformer")
    demo.add_argument("--uplink", help="uplink codec chain, e.g. 'ef | topk:0.01 | qsgd:4 | entropy'")
    demo.add_argument("--downlink", help="downlink codec chain")
    demo.add_argument(
        "--downlink-update",
        help="server-side chain for the global update, e.g. 'ef | topk:0.01' ('none': off)",
    )
    demo.add_argument(
        "--downlink-prior",
        choices=["none", "initial"],
        help="'initial': a residual downlink starts from the initial model both sides build from the seed",
    )
    demo.add_argument(
        "--server-optimizer",
        metavar="NAME[:LR]",
        help="sgd, momentum, adam or yogi, e.g. 'adam:0.03' (default: sgd:1, FedAvg)",
    )
    demo.add_argument("--out", help="run folder (default: runs/demo-<time>)")
    demo.add_argument(
        "--ae",
        action="store_true",
        help="the autoencoder federation: prepass, decoder uploads, AE rounds, baseline",
    )
    demo.add_argument(
        "--paper", action="store_true", help="with --ae: the paper's literal method (weights through a FC AE)"
    )
    demo.add_argument(
        "--no-baseline", action="store_true", help="skip the in-process uncompressed run with the same seed"
    )
    demo.set_defaults(func=run_demo)
    demo_ae = sub.add_parser(
        "demo-ae", help="the autoencoder demo: same as `demo --ae`", parents=[], add_help=True
    )
    for a in demo._actions[1:]:
        if a.dest not in ("ae",):
            demo_ae._add_action(a)
    demo_ae.set_defaults(func=run_demo_ae)
    codecs = sub.add_parser("codecs", help="list the registered codecs")
    codecs.set_defaults(func=list_codecs)
    health = sub.add_parser(
        "health", help="check an aggregator through the gRPC health service (exit 0: SERVING)"
    )
    health.add_argument("--server", default="localhost:50051", help="aggregator address HOST:PORT")
    health.add_argument(
        "--service", default="", help="service name ('' is the whole server; fedsqueeze.v1.Federation)"
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds")
    health.set_defaults(func=check_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PlanError as exc:
        die(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
