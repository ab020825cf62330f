"""A real Prometheus scrapes a live local federation; the dashboard's queries and the byte counts are checked.

Prometheus is Debian's `prometheus` package (installed by `make prometheus`, by .ci/run, or here
when missing and we are root). It scrapes the aggregator and three collaborator processes every
second on loopback, with the job names of deploy/prometheus.yml. After the last round and one more
scrape of every target, through Prometheus's HTTP API:
- every PromQL expression of deploy/grafana/dashboards/fedsqueeze.json returns data;
- the byte counters equal the run report's totals exactly, per direction and kind, per
  collaborator, and from each collaborator's own side.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, free_port, spawn
from .prometheus_server import Prometheus, ensure_prometheus

pytestmark = pytest.mark.slow

ROUNDS = 8  # with 20 local epochs: the federation spans several 1 s scrapes, so rate() sees its counters move
COLLABORATORS = 3
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedsqueeze.json"
AGG = 'job="fedsqueeze-aggregator"'
COL = 'job="fedsqueeze-collaborator"'
# Grafana's variables, as the test substitutes them: a rate window that spans the whole run.
GRAFANA_VARIABLES = {"$__rate_interval": "10m", "$__interval": "1s", "$__range": "10m"}


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    path, why = ensure_prometheus()
    if path is None:
        pytest.skip(f"no Prometheus server: {why}")
    return path


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expr) for every query target in the dashboard, rows included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def scrape_config(agg_port: int, collab_ports: list[int]) -> dict[str, Any]:
    """deploy/prometheus.yml with its job names, scraping loopback every second."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    targets = {
        "fedsqueeze-aggregator": [f"127.0.0.1:{agg_port}"],
        "fedsqueeze-collaborator": [f"127.0.0.1:{p}" for p in collab_ports],
    }
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(targets), jobs
    config["scrape_configs"] = [
        {"job_name": name, "static_configs": [{"targets": t}]} for name, t in targets.items()
    ]
    return config


def write_plan(path: Path) -> None:
    path.write_text(json.dumps({
        "task": {"dataset": "digits"},
        "model": {"name": "mlp"},
        "rounds": ROUNDS,
        "collaborators": {"min": COLLABORATORS, "join_timeout_s": 120},
        "training": {"local_epochs": 20, "lr": 0.1},
        "uplink": {"chain": "fp16 | zstd"},
        "downlink": {"chain": "fp16"},
        "round_timeout_s": 120,
    }))  # fmt: skip


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def values(prom: Prometheus, expr: str, at: float, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in prom.query(expr, at)}


def test_prometheus_scrapes_a_live_federation(tmp_path, procs, prometheus_binary) -> None:
    agg_port, agg_metrics = free_port(), free_port()
    collab_metrics = [free_port() for _ in range(COLLABORATORS)]
    prom = Prometheus(
        prometheus_binary, scrape_config(agg_metrics, collab_metrics), tmp_path / "prometheus", free_port()
    )
    try:
        prom.wait_ready()
        version = prom.version()
        write_plan(tmp_path / "plan.json")
        report_path = tmp_path / "report.json"
        agg = spawn(["fedsqueeze.aggregator", "serve", "--port", str(agg_port), "--host", "127.0.0.1",
                     "--plan", str(tmp_path / "plan.json"), "--report", str(report_path), "--keep-serving",
                     "--metrics-port", str(agg_metrics), "--metrics-host", "127.0.0.1"], log=tmp_path / "agg.log")  # fmt: skip
        procs.append(agg)
        for i, port in enumerate(collab_metrics):
            procs.append(spawn(["fedsqueeze.collaborator", "join", "--server", f"127.0.0.1:{agg_port}", "--no-progress",
                                "--name", f"m{i}", "--report", str(tmp_path / f"c{i}.json"), "--metrics-port", str(port),
                                "--metrics-host", "127.0.0.1", "--metrics-linger", "120"], log=tmp_path / f"c{i}.log"))  # fmt: skip

        # Wait for the last round, in the aggregator's report and in every collaborator's.
        deadline = time.monotonic() + 240
        while True:
            report = read_json(report_path)
            sent = [read_json(tmp_path / f"c{i}.json") for i in range(COLLABORATORS)]
            if (
                report
                and len(report["rounds"]) == ROUNDS
                and all(s and len(s["rounds"]) == ROUNDS for s in sent)
            ):
                break
            assert agg.poll() is None, (tmp_path / "agg.log").read_text()
            assert time.monotonic() < deadline, (
                "the federation did not finish: " + (tmp_path / "agg.log").read_text()
            )
            time.sleep(0.5)
        done = time.time() + 1.0  # the round gauges are set just after the report is written

        # ... and for two more successful scrapes of every target after that: a counter first seen in the
        # last one (scrapes come late on a loaded machine) still has the two samples rate() needs.
        deadline = time.monotonic() + 60
        for _ in range(2):
            while True:
                up = values(prom, 'timestamp(up{job=~"fedsqueeze-.*"} == 1)', time.time(), "instance")
                if len(up) == COLLABORATORS + 1 and min(up.values()) > done:
                    break
                assert time.monotonic() < deadline, (
                    f"targets not scraped after the last round: {prom.targets()}"
                )
                time.sleep(0.5)
            done = max(up.values())
        at = time.time()
        assert report is not None
        summary = report["summary"]
        collaborators = {s["collaborator_id"]: s["rounds"] for s in sent if s}

        # Byte counters = the run report, exactly.
        agg_bytes = values(
            prom, f"sum by (direction, kind) (fedsqueeze_bytes_total{{{AGG}}})", at, "direction", "kind"
        )
        assert agg_bytes == {
            ("up", "raw"): summary["up_raw"], ("up", "wire"): summary["up_wire"], ("up", "decoder"): summary["decoder"],
            ("down", "raw"): summary["down_raw"], ("down", "wire"): summary["down_wire"],
        }  # fmt: skip
        assert (
            summary["up_wire"] < summary["up_raw"] * 0.6 and summary["down_wire"] < summary["down_raw"] * 0.6
        )
        per_collab = values(prom, f"sum by (collaborator, direction, kind) (fedsqueeze_bytes_total{{{AGG}}})", at,
                            "collaborator", "direction", "kind")  # fmt: skip
        own_side = values(prom, f"sum by (collaborator, direction, kind) (fedsqueeze_bytes_total{{{COL}}})", at,
                          "collaborator", "direction", "kind")  # fmt: skip
        expected: dict[tuple[str, ...], float] = {}
        for cid, rounds in collaborators.items():
            for key in ("up_raw", "up_wire", "down_raw", "down_wire"):
                direction, kind = key.split("_")
                expected[(cid, direction, kind)] = sum(r[key] for r in rounds)
            expected[(cid, "up", "decoder")] = 0
        assert per_collab == expected
        assert own_side == expected

        # Messages and the per-round gauges.
        messages = values(
            prom,
            f"sum by (direction, type, status) (fedsqueeze_messages_total{{{AGG}}})",
            at,
            "direction",
            "type",
            "status",
        )
        assert messages == {
            ("up", "update", "OK"): ROUNDS * COLLABORATORS,
            ("down", "model", "OK"): ROUNDS * COLLABORATORS,
        }
        last = report["rounds"][-1]
        gauges = {name: values(prom, f"{name}{{{AGG}}}", at)[()] for name in (
            "fedsqueeze_round", "fedsqueeze_round_participants", "fedsqueeze_round_dropped",
            "fedsqueeze_model_accuracy_ratio", "fedsqueeze_model_loss", "fedsqueeze_cumulative_savings_ratio",
            "fedsqueeze_collaborators_active")}  # fmt: skip
        assert gauges["fedsqueeze_round"] == ROUNDS
        assert (
            gauges["fedsqueeze_round_participants"] == COLLABORATORS
            and gauges["fedsqueeze_round_dropped"] == 0
        )
        assert gauges["fedsqueeze_model_accuracy_ratio"] == pytest.approx(last["accuracy"], abs=1e-12)
        assert gauges["fedsqueeze_model_loss"] == pytest.approx(last["loss"], rel=1e-9)
        raw, spent = (
            summary["up_raw"] + summary["down_raw"],
            summary["up_wire"] + summary["down_wire"] + summary["decoder"],
        )
        assert gauges["fedsqueeze_cumulative_savings_ratio"] == pytest.approx(1 - spent / raw, rel=1e-9)
        nmse = values(prom, f"fedsqueeze_reconstruction_nmse_last{{{COL}}}", at, "instance", "direction")
        assert set(nmse) == {(f"127.0.0.1:{port}", "up") for port in collab_metrics}
        assert all(0 < v < 1e-3 for v in nmse.values()), nmse  # fp16 rounding

        # Every query of the dashboard returns data.
        exprs = dashboard_expressions()
        assert len(exprs) >= 12
        # rate() needs two samples of a series in its window: on a loaded machine scrapes come late, so
        # ask again as the live targets are scraped on (up to 60 s), as a dashboard that refreshes would.
        deadline = time.monotonic() + 60
        while True:
            empty = []
            for title, expr in exprs:
                result = prom.query(substitute(expr), time.time())
                finite = [r for r in result if math.isfinite(float(r["value"][1]))]
                if not finite:
                    empty.append((title, expr, result))
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert not empty, f"dashboard queries without data: {empty}"
        print(
            f"Prometheus {version}: {len(exprs)} dashboard expressions returned data; byte counters match the report"
        )

        agg.send_signal(signal.SIGTERM)
        assert agg.wait(timeout=60) == 0, (tmp_path / "agg.log").read_text()
    finally:
        prom.stop()
