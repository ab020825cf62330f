"""deploy/: the compose file and the Kubernetes manifests against their schemas, and the pieces fitting together.

These tests start no Docker engine or cluster (tests/test_compose.py, `make compose-test`, runs the
compose deployment for real), so here they are validated:
- docker-compose.yml and the test override docker-compose.test.yml: the Compose Specification's JSON
  schema as vendored by check-jsonschema (`--builtin-schema vendor.compose-spec`); and `docker compose
  config` / `docker-compose config` (1.29) where a compose client exists;
- Dockerfile: pinned base image, pinned and hashed requirements, the CPU torch, a non-root user;
- deploy/k8s/*.yaml: the Kubernetes 1.37 OpenAPI schemas bundled in kubernetes-validate, strict
  (unknown fields are errors);
- prometheus.yml (compose and Kubernetes): `promtool check config` where promtool is installed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37.0"
K8S_FILES = sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


COMPOSE_FILES = [DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.test.yml"]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_compose_file_matches_the_compose_spec(tmp_path) -> None:
    for path in COMPOSE_FILES:
        proc = check_compose_schema(path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # The validator is not vacuous: a misspelt key is refused.
    broken = compose()
    broken["services"]["collaborator"]["helthcheck"] = broken["services"]["collaborator"].pop("healthcheck")
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    assert check_compose_schema(tmp_path / "docker-compose.yml").returncode != 0


def test_compose_services_fit_together() -> None:
    c = compose()
    services = c["services"]
    assert set(services) == {"aggregator", "collaborator", "prometheus", "grafana"}
    agg, col = services["aggregator"], services["collaborator"]
    # health through the gRPC health service, via the image's own client
    assert agg["healthcheck"]["test"][:3] == ["CMD", "fedsqueeze", "health"]
    assert col["depends_on"]["aggregator"]["condition"] == "service_healthy"
    # scalable: no fixed name or host port on the collaborators
    assert "container_name" not in col and "ports" not in col
    assert "--metrics-port" in " ".join(col["command"]) and "--metrics-port=9100" in agg["command"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in agg["volumes"]}
    assert mounts["reports"] == "/data/reports" and mounts["checkpoints"] == "/data/checkpoints"
    assert {"reports", "checkpoints"} <= set(c["volumes"])
    assert f"--state-dir={mounts['checkpoints']}" in agg["command"]  # a restarted container resumes
    # docker-compose 1.x refuses a top-level `name`; deploy/.env names the project for both versions
    assert "name" not in c and "COMPOSE_PROJECT_NAME=fedsqueeze" in (DEPLOY / ".env").read_text().splitlines()
    # bind mounts point at files in deploy/, where Grafana and Prometheus expect them
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    grafana = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/fedsqueeze.yml").read_text())
    assert grafana["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert grafana["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert (
        dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])["./prometheus.yml"]
        == "/etc/prometheus/prometheus.yml"
    )


def compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file() -> None:
    client = compose_client()
    if client is None:
        pytest.skip(
            "no compose client here (`docker compose` plugin or docker-compose); the schema test covers the file"
        )
    for files in (COMPOSE_FILES[:1], COMPOSE_FILES):
        args = [a for f in files for a in ("-f", str(f))]
        proc = subprocess.run(
            [*client, *args, "config", "--quiet"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr


def test_test_override_only_swaps_what_has_no_image_here() -> None:
    override = yaml.safe_load((DEPLOY / "docker-compose.test.yml").read_text())["services"]
    assert override["grafana"] == {"profiles": ["grafana"]}  # left out, not edited out of the main file
    assert set(override["prometheus"]) == {"image"}  # same command, configuration and health check
    plan_mount = override["aggregator"]["volumes"]
    assert plan_mount == ["./compose-test/plan.json:/etc/fedsqueeze/plan.json:ro"]
    plan = json.loads((DEPLOY / "compose-test/plan.json").read_text())
    assert plan["quorum"] < plan["collaborators"]["min"]  # one collaborator may die and the rounds go on


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, doc) for p in K8S_FILES for doc in yaml.safe_load_all(p.read_text()) if doc]


@pytest.mark.parametrize(
    ("name", "doc"), k8s_documents(), ids=lambda v: v if isinstance(v, str) else v.get("kind")
)
def test_kubernetes_manifest_matches_the_schema(name, doc) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_is_strict() -> None:
    import kubernetes_validate

    deployment = next(doc for _, doc in k8s_documents() if doc["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kubernetes_resources_fit_together() -> None:
    docs = k8s_documents()
    kinds = [(d["kind"], d["metadata"]["name"]) for _, d in docs]
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S_FILES)
    agg = next(d for _, d in docs if d["kind"] == "StatefulSet")
    assert agg["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    pod = agg["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["readinessProbe"]["grpc"]["port"] == 50051  # the gRPC health service
    assert ("Service", agg["spec"]["serviceName"]) in kinds
    collab = next(
        d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "fedsqueeze-collaborator"
    )
    assert collab["spec"]["replicas"] >= 2
    args = collab["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--server={agg['spec']['serviceName']}:50051" in args
    plan = json.loads(
        next(d for _, d in docs if d["metadata"]["name"] == "fedsqueeze-plan")["data"]["plan.json"]
    )
    assert plan["collaborators"]["min"] <= collab["spec"]["replicas"]


def test_dockerfile_runs_as_a_non_root_user_with_cpu_torch() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "whl/cpu" in text and "torch==" in text
    assert '"fedsqueeze", "health"' in text


def test_dockerfile_is_pinned_and_its_final_stage_has_no_build_tools() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = [s for s in text.split("\nFROM ")[1:]]
    assert len(stages) == 2
    for stage in stages:  # a Python patch release on a named Debian release
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", stage.split()[0]), stage.split()[0]
    final = stages[-1]
    assert "COPY --from=build /opt/fedsqueeze /opt/fedsqueeze" in final
    assert not re.search(r"\b(pip|apt-get)\b", final)  # nothing installed in the final stage
    assert "--require-hashes -r /tmp/requirements.txt" in text and "pip uninstall --yes pip" in text
    assert "!deploy/requirements.txt" in (DEPLOY / "Dockerfile.dockerignore").read_text()


def test_image_requirements_are_pinned_with_hashes() -> None:
    from packaging.requirements import Requirement

    def pins(path: Path) -> dict[str, str]:
        lines = [line.split("\\")[0].strip() for line in path.read_text().splitlines()]
        reqs = [Requirement(line) for line in lines if line and not line.startswith(("#", "--"))]
        assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs), reqs
        return {r.name.lower(): str(r.specifier) for r in reqs}

    wanted = pins(DEPLOY / "requirements.in")
    assert pins(DEPLOY / "requirements.txt") == wanted
    for block in re.split(r"\n(?=\S)", (DEPLOY / "requirements.txt").read_text()):
        if "==" in block.split("\n")[0] and not block.startswith("#"):
            assert "--hash=sha256:" in block, block  # pip install --require-hashes
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    direct = {Requirement(r).name.lower() for r in project} - {"torch"}  # torch: the CPU wheel index
    assert direct <= set(wanted), direct - set(wanted)


def prometheus_configs(tmp_path: Path) -> list[Path]:
    k8s = next(d for _, d in k8s_documents() if d["metadata"]["name"] == "fedsqueeze-prometheus")
    (tmp_path / "k8s-prometheus.yml").write_text(k8s["data"]["prometheus.yml"])
    return [DEPLOY / "prometheus.yml", tmp_path / "k8s-prometheus.yml"]


def test_prometheus_configs_pass_promtool(tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (`make prometheus` installs Debian's prometheus package)")
    for path in prometheus_configs(tmp_path):
        proc = subprocess.run(
            [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        jobs = {j["job_name"] for j in yaml.safe_load(path.read_text())["scrape_configs"]}
        assert jobs == {"fedsqueeze-aggregator", "fedsqueeze-collaborator"}  # the dashboard selects on these


def test_dashboard_has_the_issues_panels_on_the_provisioned_datasource() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/fedsqueeze.json").read_text())
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    uid = datasources[0]["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in ("bandwidth per collaborator", "compression ratio over rounds", "cumulative bytes, with the decoder cost",
                   "accuracy against cumulative bytes", "round duration", "active collaborators"):  # fmt: skip
        assert wanted in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"]["uid"] == uid and p["targets"]
        assert all(t["datasource"]["uid"] == uid and t["expr"] for t in p["targets"])


def test_the_image_gets_every_package_folder() -> None:
    """Every folder pyproject.toml installs as a subpackage is copied into the image and let through the dockerignore."""
    import tomllib

    folders = {
        d.split("/")[0]
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ].values()
    }
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for folder in sorted(folders):
        assert f"COPY {folder} ./{folder}" in dockerfile, folder
        assert f"!{folder}/**" in ignore, folder
