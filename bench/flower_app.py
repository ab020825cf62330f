"""Flower's FedAvg with and without fedsqueeze's chains, on Flower's own deployment runtime.

One local federation (a SuperLink and N SuperNodes as processes on loopback, `--insecure`) runs
the example app in `examples/flower/` once per configuration, one run after the other:

- Flower's FedAvg, uncompressed (the app with `compress = false`: the mod passes Flower's
  messages through untouched);
- Flower's FedAvg with fedsqueeze's default chains (`CompressedStrategy` + `compression_mod`);
- Flower's FedAdam with the fewest-bytes recipe's lr and beta1 (`fedsqueeze/plans/fewest-bytes.json`),
  uncompressed, and with the recipe's chains, the downlink primed with the initial model.

Bytes are Flower's own numbers: the size of each message's content as `message_size_mod` logs it
on the SuperNodes (incoming = downlink, outgoing = uplink), and the SuperLink's traffic accounting
of the run (`flwr ls --format json`: inbound/outbound bytes of its Fleet API, envelopes, object
ids and FAB/run lookups included). Accuracy is the ServerApp's evaluation of the global model on
the held-out 20 % of digits after each round. Runs in the Flower environment (`make
bench-flower-app`, which builds .venv-flower):

    .venv-flower/bin/python -m bench.flower_app --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flower"
CONNECTION = "fedsqueeze-local"
# No telemetry, no update check, no runtime `uv sync`: nothing leaves the machine.
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
SIZE_LINE = re.compile(r"(Incoming|Outgoing) message size: (\d+) bytes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunResult:
    run_id: str
    config: dict[str, Any]
    report: dict[str, Any]
    traffic: dict[str, int]  # the SuperLink's accounting: inbound-bytes, outbound-bytes, total-bytes
    incoming: list[int] = field(default_factory=list)  # message_size_mod on the nodes: downlink messages
    outgoing: list[int] = field(default_factory=list)  # uplink messages
    seconds: float = 0.0

    @property
    def rounds(self) -> int:
        return int(self.config["num-server-rounds"])

    def accuracy(self, server_round: int | None = None) -> float:
        return float(self.report["accuracy"][str(self.rounds if server_round is None else server_round)])


class LocalFederation:
    """A SuperLink and `nodes` SuperNodes on loopback, started from the Flower environment's bin/."""

    def __init__(self, nodes: int, workdir: Path, bin_dir: Path | None = None) -> None:
        self.nodes = nodes
        self.workdir = workdir
        self.bin_dir = bin_dir or Path(sys.executable).parent
        self.port = free_port()
        self.home = workdir / "flwr-home"
        self.env = {
            **os.environ,
            **QUIET_ENV,
            "FLWR_HOME": str(self.home),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("VIRTUAL_ENV", None)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []
        self._stack = ExitStack()
        self._runs = 0

    def __enter__(self) -> LocalFederation:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        superlink_log = self.workdir / "superlink.log"
        self._start(
            [
                "flower-superlink",
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            superlink_log,
        )
        self._wait_for(superlink_log, "Uvicorn running", 60)
        for i in range(self.nodes):
            log = self.workdir / f"supernode-{i}.log"
            self._start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                         "--node-config", f"partition-id={i} num-partitions={self.nodes}"], log)  # fmt: skip
            self._logs.append(log)
        for log in self._logs:
            self._wait_for(log, "SuperNode ID", 60)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                # its own session: the SuperExec and app processes it started
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._stack.close()

    def _start(self, cmd: list[str], log: Path) -> None:
        out = self._stack.enter_context(log.open("wb"))
        self._procs.append(
            subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def _wait_for(self, log: Path, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in log.read_text(errors="replace"):
                return
            if any(p.poll() is not None for p in self._procs):
                raise RuntimeError(
                    f"a Flower process exited while starting; see {log}:\n{log.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.2)
        raise TimeoutError(f"{log} did not say {text!r} within {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["flwr", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run(self, config: dict[str, Any], *, app: Path = EXAMPLE, timeout: float = 1800) -> RunResult:
        """`flwr run` the app with these run-config overrides; waits for the run to finish."""
        self._runs += 1
        report_path = self.workdir / f"report-{self._runs}.json"
        config = {**config, "min-nodes": self.nodes, "report": str(report_path)}
        offsets = [log.stat().st_size for log in self._logs]
        overrides = self.workdir / f"run-config-{self._runs}.toml"
        overrides.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))
        start = time.monotonic()
        done = self.flwr(
            "run", str(app), CONNECTION, "--run-config", str(overrides), "--stream", timeout=timeout
        )
        seconds = time.monotonic() - start
        (self.workdir / f"run-{self._runs}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not report_path.exists():
            raise RuntimeError(
                f"flwr run failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}"
            )
        match = re.search(r"run[- _]?id[^0-9]*(\d+)", done.stdout + done.stderr, re.IGNORECASE)
        listing = self.flwr("ls", CONNECTION, "--format", "json")
        runs = json.loads(listing.stdout)["runs"]
        run = next((r for r in runs if match and r["run-id"] == match.group(1)), None) or max(
            runs, key=lambda r: r["pending-at"]
        )
        incoming: list[int] = []
        outgoing: list[int] = []
        time.sleep(1.0)  # the nodes' last log lines
        for log, offset in zip(self._logs, offsets, strict=True):
            with log.open("rb") as f:
                f.seek(offset)
                for kind, size in SIZE_LINE.findall(f.read().decode(errors="replace")):
                    (incoming if kind == "Incoming" else outgoing).append(int(size))
        return RunResult(
            str(run["run-id"]),
            config,
            json.loads(report_path.read_text()),
            run["network-traffic"],
            incoming,
            outgoing,
            seconds,
        )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return str(value)


def fewest_bytes() -> dict[str, Any]:
    """The recipe's run config: chains and FedAdam settings from fedsqueeze/plans/fewest-bytes.json."""
    plan = json.loads((resources.files("fedsqueeze") / "plans" / "fewest-bytes.json").read_text())
    optimizer = plan["aggregation"]["server_optimizer"]
    if optimizer["name"] != "adam":
        raise SystemExit(
            f"the fewest-bytes plan's server optimizer is {optimizer['name']!r}; this benchmark maps only adam to Flower"
        )
    return {
        "strategy": "fedadam", "compress": True, "uplink": plan["uplink"]["chain"], "downlink": plan["downlink"]["chain"],
        "prior": plan["downlink"].get("prior") == "initial", "eta": optimizer["lr"], "beta1": optimizer.get("beta1", 0.9),
    }  # fmt: skip


def configurations() -> list[tuple[str, dict[str, Any]]]:
    from fedsqueeze.plan import DEFAULT_DOWNLINK, DEFAULT_UPLINK

    recipe = fewest_bytes()
    return [
        ("Flower FedAvg, uncompressed", {"strategy": "fedavg", "compress": False}),
        (
            "Flower FedAvg + fedsqueeze's default chains",
            {"strategy": "fedavg", "compress": True, "uplink": DEFAULT_UPLINK, "downlink": DEFAULT_DOWNLINK},
        ),
        ("Flower FedAdam (the recipe's lr and beta1), uncompressed", {**recipe, "compress": False}),
        ("Flower FedAdam + the fewest-bytes recipe's chains", recipe),
    ]


def table(results: list[tuple[str, RunResult]], nodes: int) -> list[str]:
    from bench.common import md_code

    base = results[0][1]
    lines = [
        "| run | accuracy (final / best) | downlink B per round | uplink B per round | SuperLink traffic per round (out / in) | vs FedAvg uncompressed: down / up / traffic |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in results:
        accuracies = [float(v) for k, v in r.report["accuracy"].items() if k != "0"]
        down, up = sum(r.incoming) / r.rounds, sum(r.outgoing) / r.rounds
        out_b, in_b = r.traffic["outbound-bytes"] / r.rounds, r.traffic["inbound-bytes"] / r.rounds
        ratios = (sum(base.incoming) / max(sum(r.incoming), 1), sum(base.outgoing) / max(sum(r.outgoing), 1),
                  base.traffic["total-bytes"] / max(r.traffic["total-bytes"], 1))  # fmt: skip
        chains = (
            f" ({md_code(r.config['uplink'])} up, {md_code(r.config['downlink'])} down{', prior' if r.config.get('prior') else ''})"
            if r.config.get("compress")
            else ""
        )
        lines.append(f"| {label}{chains} | {100 * r.accuracy():.1f} % / {100 * max(accuracies):.1f} % | {down:,.0f} | {up:,.0f} | "
                     f"{out_b:,.0f} / {in_b:,.0f} | {ratios[0]:.1f}x / {ratios[1]:.1f}x / {ratios[2]:.1f}x |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--out", type=Path, default=None, help="write the table to this Markdown file as its own section"
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the logs and reports in this directory")
    args = parser.parse_args(argv)
    import flwr

    results: list[tuple[str, RunResult]] = []
    start = time.monotonic()
    with ExitStack() as stack:
        workdir = args.keep or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fedsqueeze-flower-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        federation = stack.enter_context(LocalFederation(args.nodes, workdir))
        for label, config in configurations():
            result = federation.run({**config, "num-server-rounds": args.rounds})
            print(
                f"{label}: {100 * result.accuracy():.1f} % after {args.rounds} rounds, {result.seconds:.0f} s",
                flush=True,
            )
            results.append((label, result))
    lines = [
        f"`make bench-flower-app` (`.venv-flower/bin/python -m bench.flower_app --nodes {args.nodes} --rounds {args.rounds}`), "
        f"flwr {flwr.__version__}: the app in `examples/flower/` on Flower's deployment runtime, a SuperLink and {args.nodes} "
        f"SuperNodes on loopback, every node training every round; scikit-learn's digits (IID shards of the 80 % train split), "
        f"64-200-10 MLP (15,010 parameters), 2 local epochs; accuracy of the global model on the 20 % held out. The four runs "
        f"share one federation, one after the other, {time.monotonic() - start:.0f} s in all on 2 cores.",
        "",
        *table(results, args.nodes),
        "",
        "Downlink and uplink bytes are `message_size_mod`'s (Flower's built-in mod, first in the ClientApp's mods) on the "
        "SuperNodes, summed over the nodes: the size of each message's records, here the ArrayRecord (model or compressed "
        "payload, with NumPy's 128-byte header per array), the ConfigRecord and the MetricRecord. SuperLink traffic is its "
        "own accounting of the run (`flwr ls --format json`: inbound and outbound bytes of its Fleet API), which adds "
        "Flower's per-message envelopes, object ids and polling, about the same in every run: it bounds the ratio a small "
        "model can show. Flower's FedAdam returns float64 arrays: its uncompressed downlink is twice FedAvg's (the fedsqueeze rows code them as float32).",
    ]
    print("\n".join(lines))
    if args.out:
        from bench.common import replace_section

        replace_section(args.out, "flower-app", "fedsqueeze inside a Flower app", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
