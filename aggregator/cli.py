"""`aggregator`: the command line of the aggregator service.

aggregator serve --port 50051 [--plan plan.json] [--report runs/report.json] [--keep-serving]
                 [--max-concurrent-uploads 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedsqueeze.console import ROUND_HEADER, die, round_row, setup_logging, summary_lines
from fedsqueeze.metrics import Metrics, start_metrics_server
from fedsqueeze.model_file import ModelError
from fedsqueeze.plan import Plan, PlanError
from fedsqueeze.report import RoundRecord
from fedsqueeze.tasks import DataError
from fedsqueeze.tls import ServerTLS, TLSConfigError
from fedsqueeze.user_code import UserCodeError, load_callable

from .admission import AdmissionError, JoinPolicy
from .checkpoint import CheckpointError
from .evaluation import Evaluator, InitialModel
from .upload_slots import DEFAULT_MAX_CONCURRENT_UPLOADS


def _serve(args: argparse.Namespace) -> int:
    from .server import AggregatorServer, limit_malloc_arenas

    if args.max_concurrent_uploads < 1:
        die(f"--max-concurrent-uploads must be at least 1, got {args.max_concurrent_uploads}")
    plan = Plan.load(args.plan) if args.plan else Plan()
    overrides = {"rounds": args.rounds}
    for key, value in overrides.items():
        if value is not None:
            setattr(plan, key, value)
    if args.min_collaborators is not None:
        plan.collaborators.min = args.min_collaborators
    if args.keep_serving:
        plan.keep_serving = True
    plan.validate()
    limit_malloc_arenas()  # before the server's threads exist; see aggregator/server.py
    report = Path(args.report) if args.report else None

    def on_round(record: RoundRecord) -> None:
        print(round_row(record), flush=True)

    metrics = Metrics("aggregator", per_collaborator=args.metrics_per_collaborator)
    tls = ServerTLS.from_files(args.tls_cert, args.tls_key, args.tls_ca)
    policy = JoinPolicy.from_files(args.join_secret_file, args.enrollment_file)
    state_dir = Path(args.state_dir) if args.state_dir else None
    model = InitialModel.from_file(args.initial_model, plan.model.buffers) if args.initial_model else None
    evaluator = load_evaluator(args.evaluate, model) if args.evaluate else None
    server = AggregatorServer(
        plan,
        host=args.host,
        port=args.port,
        report_path=report,
        on_round=on_round,
        metrics=metrics,
        state_dir=state_dir,
        tls=tls,
        max_concurrent_uploads=args.max_concurrent_uploads,
        join_policy=policy,
        model=model,
        evaluator=evaluator,
    ).start()
    if args.metrics_port is not None:
        _, metrics_port = start_metrics_server(args.metrics_port, metrics, args.metrics_host)
        print(f"metrics on port {metrics_port}", flush=True)
    server.install_signal_handlers()
    f = server.federation
    print(
        f"aggregator on port {server.port}: {plan.rounds} rounds of {plan.model.name} on {plan.task.dataset} "
        f"({f.layout.numel:,} parameters), waiting for {plan.collaborators.min} collaborators",
        flush=True,
    )
    print(f"uplink: {f.up_chain}   downlink: {f.down_chain}", flush=True)
    if f.resumed_from is not None:
        print(f"resumed from {state_dir} after round {f.resumed_from}", flush=True)
    if tls is not None:
        print(
            "transport: " + ("mutual TLS (client certificate CN = collaborator id)" if tls.mutual else "TLS"),
            flush=True,
        )
    if not policy.open:
        print("admission: " + ("enrollment tokens (one identity each)" if policy.enrolled else "join secret") +
              f", at most {plan.max_members} members", flush=True)  # fmt: skip
    print(ROUND_HEADER, flush=True)
    try:
        server.wait(keep_serving=plan.keep_serving)
    finally:
        server.stop()
    if server.error is not None:
        die(str(server.error), 1)
    for line in summary_lines(f.report.summary()):
        print(line)
    if report:
        print(f"report: {report}")
    return 0


def load_evaluator(spec: str, model: InitialModel | None) -> Evaluator:
    """`--evaluate module:function`: the operator's evaluation of each global model (name -> float32 array)."""
    if model is None:
        die(
            "--evaluate needs --initial-model (the built-in model is evaluated on the plan's held-out data already)"
        )
    try:
        fn = load_callable(spec, "--evaluate")
    except UserCodeError as exc:
        die(str(exc))
    layout = model.layout

    def evaluate(weights: Any) -> dict[str, float]:
        return {str(k): float(v) for k, v in fn(layout.unflatten(weights)).items()}

    return evaluate


def _savings(args: argparse.Namespace) -> int:
    from . import savings as sv

    context: dict[str, object] = {}
    run: dict[str, object] | None = None
    if args.report:
        try:
            report = sv.load_report(args.report)
            sizes, context = sv.sizes_from_report(report)
            run = sv.as_run(report)
        except (OSError, ValueError, KeyError) as exc:
            die(f"cannot read sizes from {args.report}: {exc}")
        sizes = sv.Sizes(
            args.original or sizes.original,
            args.compressed or sizes.compressed,
            args.decoder or sizes.decoder,
        )
    else:
        if not (args.original and args.compressed and args.decoder is not None):
            die("give --report RUN/report.json, or --original, --compressed and --decoder (bytes)")
        sizes = sv.Sizes(args.original, args.compressed, args.decoder)
    if sizes.original <= 0 or sizes.compressed <= 0 or sizes.decoder < 0:
        die("sizes must be positive")
    collaborators = args.collaborators or int(context.get("collaborators", 4))  # type: ignore[call-overload]
    rounds = args.rounds or int(context.get("rounds", 20))  # type: ignore[call-overload]
    if context:
        print(f"from {args.report}: {context['messages']} uplink messages, {context['decoder_uploads']} decoder upload(s), "
              f"decoder mode of the run: {context['mode']}")  # fmt: skip
    if run is not None:
        for line in sv.as_run_lines(run):
            print(line)
    print(f"savings ratio for C = {collaborators} collaborators, R = {rounds} rounds")
    for line in sv.table(sizes, rounds, collaborators):
        print(line)
    print()
    for line in sv.grid(sizes, sorted({1, 10, rounds, 100, 1000}), sorted({1, 4, collaborators, 40, 1000})):
        print(line)
    if args.plot:
        try:
            path = sv.plot(sizes, rounds, collaborators, Path(args.plot))
        except RuntimeError as exc:
            die(str(exc))
        print(f"plot: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aggregator", description="fedsqueeze aggregator service")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the federation as a gRPC service")
    serve.add_argument("--port", type=int, default=50051, help="port to listen on (0: any free port)")
    serve.add_argument("--host", default="[::]", help="address to bind (default: all interfaces)")
    serve.add_argument("--plan", help="federation plan (JSON); default: the built-in digits plan")
    serve.add_argument("--report", help="write the run report (JSON) here, updated after every round")
    serve.add_argument("--rounds", type=int, help="override the plan's number of rounds")
    serve.add_argument("--min-collaborators", type=int, help="override collaborators.min")
    serve.add_argument(
        "--keep-serving", action="store_true", help="keep serving after the last round until SIGTERM"
    )
    serve.add_argument(
        "--state-dir",
        help="checkpoint here after every round; restarting on the same directory resumes the run",
    )
    serve.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    serve.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    serve.add_argument(
        "--tls-ca",
        help="mutual TLS: require client certificates signed by this CA; their CN is the collaborator id",
    )
    serve.add_argument(
        "--initial-model",
        metavar="FILE.safetensors",
        help="start from these weights (fedsqueeze.save_initial_model): a model of the collaborators' own; the "
        "aggregator then needs no model code, torch or data",
    )
    serve.add_argument(
        "--evaluate",
        metavar="MODULE:FUNCTION",
        help="with --initial-model: FUNCTION(name -> float32 array) -> metrics, your own evaluation of each global model",
    )
    serve.add_argument(
        "--join-secret-file", help="admission: collaborators must present the secret in this file to join"
    )
    serve.add_argument(
        "--enrollment-file",
        help="admission: enrollment tokens, one per line; each admits one collaborator identity",
    )
    serve.add_argument(
        "--max-concurrent-uploads",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_UPLOADS,
        metavar="N",
        help=f"read and decode at most N uploads at once, as many more wait, the rest are refused and retried "
        f"(bounds memory to ~N updates; default {DEFAULT_MAX_CONCURRENT_UPLOADS})",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port)",
    )
    serve.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        help="address the metrics endpoint binds (default: all interfaces)",
    )
    serve.add_argument(
        "--metrics-per-collaborator",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="label byte counters by collaborator; --no-metrics-per-collaborator bounds the series for large federations",
    )
    serve.set_defaults(func=_serve)
    sav = sub.add_parser(
        "savings", help="savings ratio and break-even of AE compression (seed 001, eq. 4-6, Figs. 10-11)"
    )
    sav.add_argument("--report", help="take the sizes from this run report")
    sav.add_argument("--original", type=float, help="bytes of one uncompressed update (O)")
    sav.add_argument("--compressed", type=float, help="wire bytes of one compressed update (S)")
    sav.add_argument("--decoder", type=float, help="bytes of one decoder (D, half the autoencoder)")
    sav.add_argument("--collaborators", type=int, help="C (default: the run's)")
    sav.add_argument("--rounds", type=int, help="R (default: the run's)")
    sav.add_argument("--plot", help="draw Figs. 10-11 to this PNG")
    sav.set_defaults(func=_savings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except (
        PlanError,
        DataError,
        ModelError,
        CheckpointError,
        TLSConfigError,
        AdmissionError,
        OSError,
    ) as exc:
        die(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
