"""`collaborator`: the command line of a collaborator process.

collaborator join --server localhost:50051 [--data digits | file.npz | mnist:DIR | cifar10:DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsqueeze.codecs import CodecError
from fedsqueeze.console import die, setup_logging
from fedsqueeze.errors import FederationError, Unreachable
from fedsqueeze.metrics import Metrics, start_metrics_server
from fedsqueeze.models import ModelError
from fedsqueeze.plan import PlanError
from fedsqueeze.tasks import DataError
from fedsqueeze.tls import ClientTLS, TLSConfigError
from fedsqueeze.user_code import UserCodeError, load_callable


def _join(args: argparse.Namespace) -> int:
    from .api import Options
    from .runner import run_collaborator

    prom = Metrics("collaborator")
    if args.metrics_port is not None:
        start_metrics_server(args.metrics_port, prom, args.metrics_host)
    options = Options(
        server=args.server,
        name=args.name,
        tls=ClientTLS.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name),
        join_token=_join_token(args),
        connect_timeout=args.connect_timeout,
        reconnect_timeout=args.reconnect_timeout,
        report_path=Path(args.report) if args.report else None,
        progress=not args.no_progress,
        metrics=prom,
        data=args.data,
        argv=list(args.app_arg or []),
    )
    threads = args.threads if args.threads is not None else _env_threads()
    result = run_collaborator(options, load_app(args.app) if args.app else None, threads)
    if args.metrics_port is not None and args.metrics_linger > 0:
        time.sleep(args.metrics_linger)  # let Prometheus scrape the final counts
    if not result["completed"]:
        die(
            f"{result['collaborator_id']}: trained {result['rounds_trained']} rounds, but the federation {result['outcome']}",
            1,
        )
    print(
        f"{result['collaborator_id']}: trained {result['rounds_trained']} rounds; federation finished",
        flush=True,
    )
    return 0


def load_app(spec: str) -> Callable[..., Any]:
    """The app named by this collaborator's operator (never by a plan)."""
    try:
        return load_callable(spec, "--app")
    except UserCodeError as exc:
        die(str(exc))


def _env_threads() -> int | None:
    value = os.environ.get("FEDSQUEEZE_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _join_token(args: argparse.Namespace) -> str:
    """The join secret or enrollment token: from --join-token-file, else $FEDSQUEEZE_JOIN_TOKEN (never a plain argument:
    other users of the machine can read command lines)."""
    if args.join_token_file:
        try:
            return Path(args.join_token_file).read_text().strip()
        except OSError as exc:
            die(f"cannot read the join token {args.join_token_file}: {exc.strerror}")
    return os.environ.get("FEDSQUEEZE_JOIN_TOKEN", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collaborator", description="fedsqueeze collaborator")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="join a federation and train until it ends")
    join.add_argument("--server", required=True, help="aggregator address HOST:PORT")
    join.add_argument(
        "--data",
        help="local data: the plan's built-in set by default (digits, mnist1d: this collaborator's shard), "
        "or FILE.npz (x, y), mnist:DIR in torchvision's layout, cifar10:DIR (cifar-10-batches-bin or -py)",
    )
    join.add_argument("--name", help="a display name (default: the hostname)")
    join.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="give up after this many seconds without the aggregator",
    )
    join.add_argument(
        "--reconnect-timeout",
        type=float,
        default=300.0,
        help="after joining: keep retrying an unreachable aggregator this many seconds",
    )
    join.add_argument("--tls-ca", help="connect with TLS, verifying the aggregator against this CA (PEM)")
    join.add_argument(
        "--tls-cert", help="mutual TLS: client certificate (PEM); its common name is this collaborator's id"
    )
    join.add_argument("--tls-key", help="mutual TLS: private key of --tls-cert (PEM)")
    join.add_argument(
        "--tls-server-name",
        help="the name to check the aggregator's certificate against (default: the host of --server)",
    )
    join.add_argument(
        "--app",
        metavar="MODULE:FUNCTION",
        help="run FUNCTION(app) of your own module (the collaborator API: app.join(model, evaluate=...)) instead of the "
        "built-in task; the module is found on this machine's import path and the current directory",
    )
    join.add_argument(
        "--app-arg", action="append", metavar="ARG", help="an argument for the app (app.argv), repeatable"
    )
    join.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own, or $FEDSQUEEZE_THREADS); the local demo uses 1",
    )
    join.add_argument("--join-token-file", help="the federation's join secret or this collaborator's enrollment token "
                      "(default: $FEDSQUEEZE_JOIN_TOKEN)")  # fmt: skip
    join.add_argument("--report", help="write what this collaborator sent and received (JSON)")
    join.add_argument("--no-progress", action="store_true", help="no progress bar")
    join.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port)",
    )
    join.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        help="address the metrics endpoint binds (default: all interfaces)",
    )
    join.add_argument(
        "--metrics-linger",
        type=float,
        default=0.0,
        help="with --metrics-port: keep serving metrics this many seconds after the federation ends",
    )
    join.set_defaults(func=_join)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except Unreachable as exc:
        die(str(exc), 1)
    except FederationError as exc:
        die(f"the aggregator refused: {exc.status}: {exc}", 1)
    except (DataError, PlanError, ModelError, CodecError, TLSConfigError, OSError) as exc:
        die(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
