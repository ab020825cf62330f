"""The docker-compose deployment, brought up for real: `make compose-test` (pytest -m compose).

On a Docker engine this test starts and stops itself, with images built here without a registry
(tests/compose_harness.py), it runs deploy/docker-compose.yml with deploy/docker-compose.test.yml
(a short plan, Prometheus from Debian's package, no Grafana): the aggregator, 4 collaborators
(`--scale`) and Prometheus. Through the running containers it checks:
- the gRPC health check (the container's own and `fedsqueeze health` through the published port);
- Prometheus, finding the collaborators by DNS service discovery, has every target up;
- faults: the aggregator container is restarted after round 2 (`docker restart`: SIGTERM, then a
  new start; it resumes from its checkpoint volume, and the polling collaborators, answered
  UNAVAILABLE while it stops, retry and carry on), then one collaborator container is killed mid-round. Docker does not apply a
  restart policy to a container it was told to kill, so that collaborator stays down (exit 137, no
  restart) and does not come back as a new member: its round closes at the deadline with the other
  3 (quorum 3), and the later rounds select those 3;
- the federation completes every round, `ok`; the report in the volume has the expected byte counts:
  raw = participants x model size, every downlink message the same fp16 size, and per round the
  collaborators' own reports (same volume) add up to the aggregator's;
- Prometheus answers each PromQL expression of the Grafana dashboard with data, and the restarted
  aggregator's byte counters equal the rounds it ran;
- the surviving collaborators exit 0 and are not restarted; `down -v` leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import compose_harness as h
from .test_metrics_prometheus import dashboard_expressions, substitute

pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(3600)]

COLLABORATORS = 4
ROUNDS = 20  # = compose-test/plan.json's
PROJECT = "fsqcomposetest"
REPORTS = "/data/reports"
AGG = 'job="fedsqueeze-aggregator"'
KEYS = ("up_raw", "up_wire", "down_raw", "down_wire", "decoder")


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    t0 = time.monotonic()
    paths = h.ensure_packages()
    h.log(f"packages ready in {time.monotonic() - t0:.0f} s: {', '.join(sorted(paths.values()))}")
    return paths


def test_docker_compose_1_29_accepts_the_files(tools) -> None:
    version = h.run([tools["docker-compose"], "version", "--short"]).stdout.strip()
    for files in ([h.COMPOSE_FILE], [h.COMPOSE_FILE, h.TEST_OVERRIDE]):
        args = [a for f in files for a in ("-f", str(f))]
        proc = h.run([tools["docker-compose"], *args, "config"])
        config = yaml.safe_load(proc.stdout)
        assert set(config["services"]) == {"aggregator", "collaborator", "prometheus", "grafana"}, version
    assert config["services"]["grafana"]["profiles"] == ["grafana"]  # left out unless asked for
    plans = [
        v for v in config["services"]["aggregator"]["volumes"] if v.endswith(":/etc/fedsqueeze/plan.json:ro")
    ]
    assert len(plans) == 1 and plans[0].endswith(
        "/deploy/compose-test/plan.json:/etc/fedsqueeze/plan.json:ro"
    ), plans


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Deployment:
    """The running compose project, as the test sees it."""

    def __init__(self, compose: h.Compose, agg_port: int, prom_port: int) -> None:
        self.compose = compose
        self.docker = compose.engine.docker
        self.agg_port = agg_port
        self.prometheus = f"http://127.0.0.1:{prom_port}"
        self.aggregator = compose.containers("aggregator")[0]

    def report(self) -> dict[str, Any] | None:
        text = self.compose.read(self.aggregator, f"{REPORTS}/report.json")
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def wait_report(
        self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 300
    ) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            state = self.compose.inspect(self.aggregator)["State"]
            assert state["Status"] in ("running", "restarting"), (
                f"the aggregator is {state['Status']}:\n{self.compose.logs(self.aggregator)}"
            )
            report = self.report()
            return report if report and check(report) else None

        return wait_until(what, ready, timeout)  # type: ignore[no-any-return]

    def state(self, container: str) -> dict[str, Any]:
        info = self.compose.inspect(container)
        return {**info["State"], "RestartCount": info["RestartCount"]}

    def healthy(self) -> bool:
        """The container's health check (`fedsqueeze health` inside it) and the same from the host."""
        if self.state(self.aggregator).get("Health", {}).get("Status") != "healthy":
            return False
        proc = subprocess.run([sys.executable, "-m", "fedsqueeze.cli", "health", "--server", f"127.0.0.1:{self.agg_port}"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        return proc.returncode == 0 and "SERVING" in proc.stdout

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr, "time": f"{at:.3f}"}
        )
        body = h.http_json(url)
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def targets(self) -> dict[str, list[dict[str, Any]]]:
        try:
            active = h.http_json(f"{self.prometheus}/api/v1/targets?state=active")["data"]["activeTargets"]
        except OSError:
            return {}
        jobs: dict[str, list[dict[str, Any]]] = {}
        for target in active:
            jobs.setdefault(target["labels"]["job"], []).append(target)
        return jobs

    def all_up(self, collaborators: int) -> bool:
        jobs = self.targets()
        counts = {job: len(ts) for job, ts in jobs.items()}
        up = all(t["health"] == "up" for ts in jobs.values() for t in ts)
        return up and counts == {"fedsqueeze-aggregator": 1, "fedsqueeze-collaborator": collaborators}

    def collaborator_reports(self) -> dict[str, dict[str, Any]]:
        """{container hostname: its report} from the reports volume."""
        names = self.docker("exec", self.aggregator, "ls", REPORTS).stdout.split()
        found = {}
        for name in names:
            if name.startswith("collaborator-") and name.endswith(".json"):
                text = self.compose.read(self.aggregator, f"{REPORTS}/{name}")
                assert text is not None, name
                found[name.removeprefix("collaborator-").removesuffix(".json")] = json.loads(text)
        return found


def run_federation(d: Deployment, collaborators: list[str]) -> None:
    # Up: health through the gRPC health service, every target found and scraped.
    wait_until("the aggregator's health check", d.healthy, 180)
    h.log("aggregator healthy (container check and `fedsqueeze health` through the published port)")
    wait_until(f"Prometheus with 1 + {COLLABORATORS} targets up", lambda: d.all_up(COLLABORATORS), 180)
    h.log(f"Prometheus: the aggregator and {COLLABORATORS} collaborators (DNS service discovery) up")

    # Fault 1: the aggregator's container is restarted after round 2 (SIGTERM, a graceful stop, then a
    # new start): it resumes from the checkpoint volume, and the collaborators reconnect with their ids.
    before = len(d.wait_report("round 2", lambda r: len(r["rounds"]) >= 2)["rounds"])
    d.docker("restart", d.aggregator)
    h.log(f"aggregator restarted (SIGTERM, then started again) after round {before}")
    # Fault 2: as soon as the restarted aggregator has finished a round, one collaborator's container
    # is killed: rounds run back to back, so it dies in an open round.
    report = d.wait_report(
        "the restarted aggregator's first round",
        lambda r: bool(r.get("resumed_after_round")) and len(r["rounds"]) > r["resumed_after_round"][-1],
    )
    victim = collaborators[1]
    d.docker("kill", victim)
    killed_after, resumed = len(report["rounds"]), report["resumed_after_round"][-1]
    h.log(f"resumed after round {resumed}; collaborator {victim[:12]} killed after round {killed_after}")
    assert resumed >= before
    wait_until("the restarted aggregator's health check", d.healthy, 120)
    h.log("the restarted aggregator is healthy")
    report = d.wait_report(f"all {ROUNDS} rounds", lambda r: len(r["rounds"]) == ROUNDS, timeout=600)
    done = time.time() + 1.0  # the round gauges are set just after the report is written
    h.log(f"federation complete: {ROUNDS} rounds, final accuracy {report['summary']['final_accuracy']:.3f}")

    # Docker applies no restart policy to a killed container: it stays down, it is not a new member.
    state = d.state(victim)
    assert (state["Status"], state["ExitCode"], state["RestartCount"]) == ("exited", 137, 0), state

    check_report(d, report, resumed, killed_after, victim)
    check_prometheus(d, report, resumed, done)

    # The survivors leave when the federation is done (exit 0 after --metrics-linger): no restart.
    survivors = [c for c in collaborators if c != victim]
    wait_until(
        "the collaborators to exit", lambda: all(d.state(c)["Status"] == "exited" for c in survivors), 120
    )
    for c in survivors:
        state = d.state(c)
        assert (state["ExitCode"], state["RestartCount"]) == (0, 0), (state, d.compose.logs(c))
        assert "federation finished" in d.compose.logs(c)
    assert d.state(d.aggregator)["Status"] == "running" and d.healthy()  # --keep-serving
    h.log("collaborators exited 0; the aggregator keeps serving, healthy")


def check_report(d: Deployment, report: dict[str, Any], resumed: int, killed_after: int, victim: str) -> None:
    rounds = report["rounds"]
    raw = report["model"]["raw_bytes"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["status"] == "ok" for r in rounds), rounds
    assert report["resumed_after_round"] == [resumed]
    assert report["summary"]["final_accuracy"] > 0.85
    # The victim's round waited for its deadline and closed with the other three; later rounds select those.
    dropped = [r for r in rounds if r["dropped"]]
    assert (
        len(dropped) == 1 and dropped[0]["dropped"] == 1 and dropped[0]["participants"] == COLLABORATORS - 1
    ), dropped
    lost_round = dropped[0]["round"]
    assert lost_round > killed_after
    assert all(r["participants"] == COLLABORATORS for r in rounds[:resumed])
    assert all(r["participants"] >= COLLABORATORS - 1 for r in rounds)
    assert all(r["participants"] == COLLABORATORS - 1 and not r["dropped"] for r in rounds[lost_round:])

    # Byte counts: the aggregator's rounds against the model size and the collaborators' own reports.
    sent = d.collaborator_reports()
    assert len(sent) == COLLABORATORS and victim[:12] in sent, sorted(sent)
    records = [rec for s in sent.values() for rec in s["rounds"]]
    fp16 = {rec["down_wire"] for rec in records}
    assert len(fp16) == 1, fp16  # one downlink chain, one model: every message the same size
    message = fp16.pop()
    assert raw // 2 < message < raw // 2 + 256
    victim_rounds = {rec["round"] for rec in sent[victim[:12]]["rounds"]}
    assert max(victim_rounds) < lost_round
    for r in rounds:
        b, n = r["bytes"], r["participants"]
        mine = [rec for rec in records if rec["round"] == r["round"]]
        # A kill can land after the aggregator took the victim's last update and before the victim wrote
        # that round to its report: only then is one record short, the victim's, in the round before it was lost.
        unrecorded = n - len(mine)
        assert unrecorded == 0 or (
            unrecorded == 1 and r["round"] == lost_round - 1 and r["round"] not in victim_rounds
        ), (r, mine)
        assert b["up_raw"] == n * raw == sum(rec["up_raw"] for rec in mine) + unrecorded * raw
        unrecorded_up = b["up_wire"] - sum(rec["up_wire"] for rec in mine)
        if unrecorded:
            assert raw // 4 < unrecorded_up < raw // 2, (r, mine)  # one fp16 | zstd message
        else:
            assert unrecorded_up == 0, (r, mine)
        assert b["decoder"] == 0
        models = b["down_raw"] // raw  # downloads; in the victim's round it may have had its model
        assert b["down_raw"] == models * raw and b["down_wire"] == models * message
        assert models == n or (r["round"] == lost_round and models == n + 1), r
        assert sum(rec["down_wire"] for rec in mine) == len(mine) * message
    summary = report["summary"]
    for key in KEYS:
        assert summary[key] == sum(r["bytes"][key] for r in rounds), key
    assert summary["up_wire"] < 0.6 * summary["up_raw"]  # fp16 | zstd
    h.log(f"report: {summary['up_wire']:,} of {summary['up_raw']:,} bytes up, {summary['down_wire']:,} of "
          f"{summary['down_raw']:,} down; the collaborators' reports add up to it round by round")  # fmt: skip


def check_prometheus(d: Deployment, report: dict[str, Any], resumed: int, done: float) -> None:
    def scraped_since_done() -> bool:
        # timestamp() of a plain selector is the sample's (of an expression, the evaluation time)
        stamps = [float(r["value"][1]) for r in d.query('timestamp(up{job=~"fedsqueeze-.*"})', time.time())]
        return len(stamps) == 1 + COLLABORATORS - 1 and min(stamps) > done and d.all_up(COLLABORATORS - 1)

    wait_until("a scrape of every target after the last round", scraped_since_done, 60)
    at = time.time()
    # The restarted aggregator's counters: exactly the rounds it ran.
    after = [r for r in report["rounds"] if r["round"] > resumed]
    counted = {
        (m["metric"]["direction"], m["metric"]["kind"]): float(m["value"][1])
        for m in d.query(f"sum by (direction, kind) (fedsqueeze_bytes_total{{{AGG}}})", at)
    }
    expected = {
        (key.split("_")[0], key.split("_")[1]): float(sum(r["bytes"][key] for r in after))
        for key in KEYS
        if key != "decoder"
    }
    assert counted == {**expected, ("up", "decoder"): 0.0}
    assert [float(m["value"][1]) for m in d.query(f"fedsqueeze_round{{{AGG}}}", at)] == [ROUNDS]
    empty = []
    exprs = dashboard_expressions()
    for title, expr in exprs:
        finite = [r for r in d.query(substitute(expr), at) if math.isfinite(float(r["value"][1]))]
        if not finite:
            empty.append((title, expr))
    assert not empty, f"dashboard queries without data: {empty}"
    h.log(
        f"Prometheus: every target up, {len(exprs)} dashboard expressions with data, the aggregator's counters match"
    )


def test_compose_deployment(tools, tmp_path: Path) -> None:
    started = time.monotonic()
    build_log, compose_log = tmp_path / "build.log", tmp_path / "compose.log"
    engine = h.DockerEngine(tools["dockerd"])
    timings: dict[str, float] = {}
    try:
        engine.start()
        t0 = time.monotonic()
        base, _, built = h.base_image(engine, build_log)
        timings["base image (built)" if built else "base image (cached)"] = time.monotonic() - t0
        t0 = time.monotonic()
        wheel = h.torch_wheel(h.dockerfile_arg(h.DEPLOY / "Dockerfile", "TORCH_VERSION"), build_log)
        with h.serve_folder(wheel.parent.parent) as index:
            image = yaml.safe_load(h.COMPOSE_FILE.read_text())["x-fedsqueeze"]["image"]
            h.build(engine, h.DEPLOY / "Dockerfile", h.ROOT, image, {"TORCH_INDEX_URL": index}, build_log)
        timings["fedsqueeze image"] = time.monotonic() - t0
        size = int(engine.docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
        h.log(f"{image}: {size / 1e9:.2f} GB ({timings['fedsqueeze image']:.0f} s)")
        t0 = time.monotonic()
        prometheus = yaml.safe_load(h.TEST_OVERRIDE.read_text())["services"]["prometheus"]["image"]
        h.build(
            engine,
            h.PROMETHEUS_DOCKERFILE,
            h.PROMETHEUS_DOCKERFILE.parent,
            prometheus,
            {"BASE_IMAGE": base},
            build_log,
        )
        timings["Prometheus image"] = time.monotonic() - t0

        agg_port, prom_port = h.free_port(), h.free_port()
        env = {"COLLABORATORS": str(COLLABORATORS), "ROUNDS": str(ROUNDS), "FEDSQUEEZE_PORT": str(agg_port),
               "PROMETHEUS_PORT": str(prom_port), "GRAFANA_PORT": str(h.free_port())}  # fmt: skip
        compose = h.Compose(engine, tools["docker-compose"], PROJECT, env, compose_log)
        t0 = time.monotonic()
        down = False
        try:
            compose("up", "-d", "--no-build", "--scale", f"collaborator={COLLABORATORS}")
            services = {
                s: compose.containers(s) for s in ("aggregator", "collaborator", "prometheus", "grafana")
            }
            assert {s: len(c) for s, c in services.items()} == {
                "aggregator": 1,
                "collaborator": COLLABORATORS,
                "prometheus": 1,
                "grafana": 0,
            }
            run_federation(Deployment(compose, agg_port, prom_port), services["collaborator"])
            timings["federation with faults"] = time.monotonic() - t0

            compose("down", "-v", "--remove-orphans")
            down = True
            label = f"label=com.docker.compose.project={PROJECT}"
            left = {kind: engine.docker(*cmd, "--filter", label).stdout.split() for kind, cmd in
                    {"containers": ("ps", "-aq"), "volumes": ("volume", "ls", "-q"), "networks": ("network", "ls", "-q")}.items()}  # fmt: skip
            assert left == {"containers": [], "volumes": [], "networks": []}, left
            assert engine.docker("ps", "-q").stdout.split() == []
            h.log("`down -v`: no container, volume or network left")
        except BaseException:
            dump = tmp_path / "containers.log"
            with dump.open("w") as f:
                for container in compose.containers():
                    f.write(
                        f"==== {container[:12]} {compose.inspect(container)['Name']}\n{compose.logs(container, 400)}\n"
                    )
            h.log(f"failed; container logs in {dump}, compose output in {compose_log}, builds in {build_log}")
            raise
        finally:
            if not down:
                compose("down", "-v", "--remove-orphans", check=False)
    finally:
        engine.stop()
    timings["total"] = time.monotonic() - started
    h.log(
        "timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; image {size / 1e9:.2f} GB"
    )
