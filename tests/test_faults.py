"""Faults with real processes: kill -9 a collaborator mid-round, kill -9 the aggregator and restart it."""

from __future__ import annotations

import json
import signal
import time

import pytest

from fedsqueeze.plan import Plan
from fedsqueeze.simulation import run_plan

from .conftest import free_port, spawn

pytestmark = pytest.mark.slow


def wait_for_round(report, n: int, proc, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the aggregator exited early"
        try:
            if len(json.loads(report.read_text())["rounds"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"round {n} did not finish in {timeout} s")


def agg_cmd(port, tmp_path, *extra) -> list[str]:
    return ["fedsqueeze.aggregator", "serve", "--port", str(port), "--host", "127.0.0.1", "--plan", str(tmp_path / "plan.json"),
            "--report", str(tmp_path / "report.json"), *extra]  # fmt: skip


def collab_cmd(port, i, tmp_path) -> list[str]:
    return ["fedsqueeze.collaborator", "join", "--server", f"127.0.0.1:{port}", "--no-progress", "--name", f"c{i}",
            "--report", str(tmp_path / f"c{i}.json")]  # fmt: skip


def test_kill_one_of_four_collaborators_mid_round(tmp_path, procs) -> None:
    plan = {"rounds": 6, "collaborators": {"min": 4, "join_timeout_s": 120}, "training": {"local_epochs": 3},
            "round_timeout_s": 10, "quorum": 3}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    port = free_port()
    agg = spawn(agg_cmd(port, tmp_path), log=tmp_path / "agg.log")
    procs.append(agg)
    collabs = [spawn(collab_cmd(port, i, tmp_path), log=tmp_path / f"c{i}.log") for i in range(4)]
    procs.extend(collabs)
    wait_for_round(tmp_path / "report.json", 2, agg)
    victim = collabs[1]
    victim.send_signal(signal.SIGKILL)  # rounds are back to back: round 3 is open
    victim.wait()
    assert agg.wait(timeout=180) == 0, (tmp_path / "agg.log").read_text()
    for i in (0, 2, 3):
        assert collabs[i].wait(timeout=60) == 0, (tmp_path / f"c{i}.log").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    rounds = data["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert all(r["status"] == "ok" and r["participants"] >= 3 for r in rounds), rounds
    assert sum(r["dropped"] for r in rounds) >= 1  # the victim's round waited for its deadline, then went on
    assert rounds[-1]["participants"] == 3  # the lost collaborator is not selected again
    assert data["summary"]["final_accuracy"] > 0.85


def test_kill_aggregator_and_restart_on_the_same_state_dir(tmp_path, procs) -> None:
    plan = {"rounds": 5, "seed": 3, "collaborators": {"min": 2, "join_timeout_s": 120}, "training": {"local_epochs": 1},
            "round_timeout_s": 60, "uplink": {"chain": "ef | topk:0.2"}}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    port = free_port()
    state = tmp_path / "state"
    agg = spawn(agg_cmd(port, tmp_path, "--state-dir", str(state)), log=tmp_path / "agg1.log")
    procs.append(agg)
    procs.extend(spawn(collab_cmd(port, i, tmp_path), log=tmp_path / f"c{i}.log") for i in range(2))
    wait_for_round(tmp_path / "report.json", 2, agg)
    agg.send_signal(signal.SIGKILL)
    agg.wait()
    time.sleep(1.0)  # the collaborators see UNAVAILABLE and back off
    agg2 = spawn(agg_cmd(port, tmp_path, "--state-dir", str(state)), log=tmp_path / "agg2.log")
    procs.append(agg2)
    assert agg2.wait(timeout=180) == 0, (tmp_path / "agg2.log").read_text()
    for i in range(2):
        assert procs[1 + i].wait(timeout=60) == 0, (tmp_path / f"c{i}.log").read_text()
    log2 = (tmp_path / "agg2.log").read_text()
    assert "resumed from" in log2
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3, 4, 5]
    assert data["resumed_after_round"] and data["resumed_after_round"][0] >= 2
    assert all(r["status"] == "ok" and r["participants"] == 2 for r in data["rounds"])
    # The uninterrupted run with the same seed: fedsqueeze.simulation, the same shards, seeds and codecs in-process.
    reference = run_plan(Plan.from_json(plan))
    got, want = data["summary"]["final_accuracy"], reference.final_accuracy
    print(f"\nresumed run final accuracy {got:.4f}, uninterrupted {want:.4f}")
    assert abs(got - want) <= 0.005
    # A different plan on the same state dir is refused with a clear error.
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "rounds": 6}))
    proc = spawn(agg_cmd(free_port(), tmp_path, "--state-dir", str(state)))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "belongs to plan" in out, out


def test_the_fault_sequence_that_lost_a_federation_now_completes(tmp_path, procs, monkeypatch) -> None:
    """The sequence from the security review, on real processes: kill -9 one collaborator mid-run (its
    rounds close at their deadline, later rounds skip it), then kill -9 the aggregator and start it again
    on the same state dir. The restarted aggregator resumes with the members that call in (quorum is
    enough; it does not wait for the dead one), the dead collaborator returns later as itself (an
    enrollment token is its identity), and every round completes."""
    n, rounds = 6, 40
    tokens = [f"token-{i}-{'x' * 8}" for i in range(n)]
    (tmp_path / "tokens").write_text("\n".join(tokens) + "\n")
    plan = {"rounds": rounds, "seed": 1, "task": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
            "collaborators": {"min": n, "fraction": 0.5, "min_per_round": 3, "join_timeout_s": 240},
            "training": {"local_epochs": 20}, "round_timeout_s": 20, "quorum": 2}  # rounds of ~1 s: time to come back  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    port, state = free_port(), tmp_path / "state"
    enroll = ("--state-dir", str(state), "--enrollment-file", str(tmp_path / "tokens"))

    def collaborator(i: int):
        monkeypatch.setenv("FEDSQUEEZE_JOIN_TOKEN", tokens[i])
        proc = spawn(collab_cmd(port, i, tmp_path), log=tmp_path / f"c{i}-{time.monotonic():.0f}.log")
        procs.append(proc)
        return proc

    agg = spawn(agg_cmd(port, tmp_path, *enroll), log=tmp_path / "agg1.log")
    procs.append(agg)
    collabs = [collaborator(i) for i in range(n)]
    wait_for_round(tmp_path / "report.json", 3, agg, timeout=300)
    collabs[1].send_signal(signal.SIGKILL)
    collabs[1].wait()
    wait_for_round(tmp_path / "report.json", 6, agg, timeout=300)
    agg.send_signal(signal.SIGKILL)
    agg.wait()
    agg2 = spawn(agg_cmd(port, tmp_path, *enroll), log=tmp_path / "agg2.log")
    procs.append(agg2)
    deadline = time.monotonic() + 300
    while (
        "resuming with 5 of the 6 members" not in (tmp_path / "agg2.log").read_text()
    ):  # it does not wait for the dead one
        assert agg2.poll() is None and time.monotonic() < deadline, (tmp_path / "agg2.log").read_text()
        time.sleep(0.2)
    returned = collaborator(1)  # the dead one comes back, as the same member
    assert agg2.wait(timeout=600) == 0, (tmp_path / "agg2.log").read_text()
    for i, proc in enumerate([*collabs[:1], *collabs[2:], returned]):
        assert proc.wait(timeout=120) == 0, f"collaborator {i}"
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["round"] for r in data["rounds"]] == list(range(1, rounds + 1))
    assert all(r["status"] == "ok" for r in data["rounds"]), [r["status"] for r in data["rounds"]]
    resumed = data["resumed_after_round"][0]
    assert resumed >= 6
    back = json.loads((tmp_path / "c1.json").read_text())["rounds"]  # the returned process's own report
    assert back and all(r["round"] > resumed for r in back)  # selected again after it came back, and trained
    assert data["summary"]["final_accuracy"] > 0.7


def test_a_collaborator_exits_non_zero_when_the_federation_ends_early(tmp_path, procs) -> None:
    """An aggregator that cannot start its rounds (here: one of two collaborators joined within the join
    timeout) tells the collaborators the federation ended early; they exit 1 saying why, not "finished"."""
    plan = {"rounds": 3, "collaborators": {"min": 2, "join_timeout_s": 40}, "round_timeout_s": 30}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    port = free_port()
    agg = spawn(agg_cmd(port, tmp_path), log=tmp_path / "agg.log")
    procs.append(agg)
    collab = spawn(collab_cmd(port, 0, tmp_path), log=tmp_path / "c0.log")
    procs.append(collab)
    assert agg.wait(timeout=180) == 1
    assert collab.wait(timeout=120) == 1
    out = (tmp_path / "c0.log").read_text()
    assert "the federation ended early: only 1 of 2 collaborators joined within the join timeout" in out, out
    assert "federation finished" not in out
