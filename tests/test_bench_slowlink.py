"""bench.slowlink's kept runs: a run is read back only for the same plan over the same links."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import slowlink
from bench.slowlink import Topology, cache_path, make_plan, run_or_reuse


def test_a_kept_run_is_keyed_by_plan_links_and_collaborators() -> None:
    plan = make_plan("identity", "identity", 4, 20, 0)
    same = cache_path(plan, Topology(4, 1.0, 10.0))
    assert same == cache_path(make_plan("identity", "identity", 4, 20, 0), Topology(4, 1.0, 10.0))
    assert same != cache_path(plan, Topology(4, 2.0, 10.0))
    assert same != cache_path(plan, Topology(4, 1.0, 5.0))
    assert same != cache_path(plan, Topology(3, 1.0, 10.0))
    assert same != cache_path(make_plan("fp16", "identity", 4, 20, 0), Topology(4, 1.0, 10.0))
    assert same != cache_path(make_plan("identity", "identity", 4, 20, 1), Topology(4, 1.0, 10.0))


def test_reuse_reads_back_what_a_run_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(slowlink, "CACHE", tmp_path / "kept")
    runs: list[dict[str, Any]] = []

    def federation(topo: Topology, plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
        runs.append(plan)
        return {"rounds": [{"round": 1, "seconds": 2.5 * len(runs)}]}

    monkeypatch.setattr(slowlink, "run_federation", federation)
    topo, plan = Topology(4, 1.0, 10.0), make_plan("identity", "identity", 4, 20, 0)
    first, _, kept = run_or_reuse(topo, plan, reuse=True)
    assert not kept and len(runs) == 1
    again, _, kept = run_or_reuse(topo, plan, reuse=True)
    assert kept and again == first and len(runs) == 1
    fresh, _, kept = run_or_reuse(topo, plan, reuse=False)  # without --reuse every run is measured again
    assert not kept and len(runs) == 2 and fresh["rounds"][0]["seconds"] == 5.0
