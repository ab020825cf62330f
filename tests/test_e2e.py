"""End to end: a real aggregator process and collaborator processes over loopback gRPC."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import free_port, spawn, start_federation

pytestmark = pytest.mark.slow


def write_plan(path, **overrides) -> None:
    plan = {
        "task": {"dataset": "digits"},
        "model": {"name": "mlp"},
        "rounds": 6,
        "collaborators": {"min": 3, "join_timeout_s": 120},
        "training": {"local_epochs": 2, "lr": 0.1},
        "uplink": {"chain": "fp16 | zstd"},
        "downlink": {"chain": "identity"},
        "round_timeout_s": 120,
    }
    plan.update(overrides)
    path.write_text(json.dumps(plan))


def test_federation_learns_and_counts_bytes_exactly(tmp_path, procs) -> None:
    write_plan(tmp_path / "plan.json")
    agg, report = start_federation(tmp_path, procs, 3)
    assert agg.wait(timeout=240) == 0, (tmp_path / "agg.log").read_text()
    for p in procs[1:]:
        assert p.wait(timeout=60) == 0
    data = json.loads(report.read_text())
    assert len(data["rounds"]) == 6
    assert data["summary"]["final_accuracy"] > 0.85
    for r in data["rounds"]:
        assert set(r) >= {"round", "accuracy", "loss", "participants", "bytes"}
        assert set(r["bytes"]) == {"up_raw", "up_wire", "down_raw", "down_wire", "decoder"}
        assert r["participants"] == 3
    sent = [json.loads((tmp_path / f"c{i}.json").read_text())["rounds"] for i in range(3)]
    for key in ("up_wire", "down_wire", "up_raw"):
        assert sum(r[key] for c in sent for r in c) == data["summary"][key]
    assert data["summary"]["up_wire"] < data["summary"]["up_raw"] * 0.6  # fp16 | zstd
    out = (tmp_path / "agg.log").read_text()
    assert "final accuracy" in out and f"report: {report}" in out


def test_collaborator_started_first_waits_and_retries(tmp_path, procs) -> None:
    port = free_port()
    collab = spawn(
        ["fedsqueeze.collaborator", "join", "--server", f"127.0.0.1:{port}", "--no-progress"],
        log=tmp_path / "c.log",
    )
    procs.append(collab)
    time.sleep(3)
    assert collab.poll() is None, "the collaborator must keep retrying"
    write_plan(tmp_path / "plan.json", rounds=1, collaborators={"min": 1})
    agg = spawn(
        [
            "fedsqueeze.aggregator",
            "serve",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--plan",
            str(tmp_path / "plan.json"),
        ]
    )
    procs.append(agg)
    assert collab.wait(timeout=120) == 0, (tmp_path / "c.log").read_text()
    assert agg.wait(timeout=60) == 0


def test_closed_port_gives_up_with_one_line(tmp_path) -> None:
    port = free_port()
    start = time.monotonic()
    proc = spawn(
        ["fedsqueeze.collaborator", "join", "--server", f"127.0.0.1:{port}", "--connect-timeout", "3"]
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - start < 30
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: could not reach the aggregator"), out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"rounds": -1}', "rounds must be in"),
        ('{"uplink": {"chain": "topq"}}', "unknown codec"),
    ],
)
def test_malformed_plan_exits_nonzero_naming_the_problem(tmp_path, content, message) -> None:
    (tmp_path / "plan.json").write_text(content)
    proc = spawn(["fedsqueeze.aggregator", "serve", "--port", "0", "--plan", str(tmp_path / "plan.json")])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert message in out and out.strip().startswith("error:")


def test_missing_plan_file(tmp_path) -> None:
    proc = spawn(["fedsqueeze.aggregator", "serve", "--port", "0", "--plan", str(tmp_path / "nope.json")])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "cannot read plan" in out


def test_partial_participation_with_server_update_chain_over_grpc(tmp_path, procs) -> None:
    """2 of 4 collaborators per round; the aggregator applies FedAvgM and compresses its own update
    (`update_chain`), and each collaborator catches up through `residual | lattice | entropy` from the
    initial model it built itself (`prior`): every process agrees on the byte counts and the model
    still learns."""
    write_plan(tmp_path / "plan.json", rounds=8, collaborators={"min": 4, "fraction": 0.5, "min_per_round": 2, "join_timeout_s": 120},
               uplink={"chain": "ef | topk:0.05 | quantize:8 | entropy"},
               downlink={"chain": "residual | lattice:0.0005 | entropy", "update_chain": "ef | topk:0.05", "prior": "initial"},
               aggregation={"server_optimizer": {"name": "momentum", "lr": 0.5}})  # fmt: skip
    agg, report = start_federation(tmp_path, procs, 4)
    assert agg.wait(timeout=240) == 0, (tmp_path / "agg.log").read_text()
    for i, p in enumerate(procs[1:]):
        assert p.wait(timeout=60) == 0, (tmp_path / f"c{i}.log").read_text()
    data = json.loads(report.read_text())
    assert data["downlink_update_chain"].startswith("ef")
    assert data["downlink_prior"] == "initial" and data["server_optimizer"]["name"] == "momentum"
    assert [r["participants"] for r in data["rounds"]] == [2] * 8
    sent = [json.loads((tmp_path / f"c{i}.json").read_text())["rounds"] for i in range(4)]
    for key in ("up_wire", "down_wire", "down_raw"):
        assert sum(r[key] for c in sent for r in c) == data["summary"][key]
    assert data["summary"]["down_wire"] < 0.3 * data["summary"]["down_raw"]
    assert data["summary"]["final_accuracy"] > 0.7
