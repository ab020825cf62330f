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


def test_the_screen_bounds_time_by_bytes_at_the_link_rates() -> None:
    from bench.slowlink_screen import link_seconds

    row = {"up": 125_000.0, "down": 1_250_000.0}  # 1 s up at 1 Mbit/s, 1 s down at 10 Mbit/s
    assert link_seconds(row, 0.5, 1.0, 10.0) == pytest.approx(2.5)


def test_the_screen_runs_its_candidates_in_process(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from bench import slowlink_screen

    out_file = tmp_path / "benchmarks.md"
    argv = ["--hidden", "8", "--rounds", "2", "--horizon", "2", "--match", "FedAdam (identity)", "--jobs", "1",
            "--seeds", "0,1", "--out", str(out_file)]  # fmt: skip
    assert slowlink_screen.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "`" in line]
    assert [line.split(" | ")[0] for line in rows] == ["| FedAvg (identity)", "| FedAdam (identity)"]
    assert all("`identity`" in line for line in rows)
    written = out_file.read_text()
    assert "<!-- slowlink-screen-seeds-0-1:start -->" in written and '--match "FedAdam (identity)"' in written
    assert "server `adam` lr 0.03" in rows[1]
    cells = [cell.strip() for cell in rows[0].split("|")]
    assert len(cells[4].split(" / ")) == 2  # rounds to target, one per seed
    assert cells[9] == "1.0x / 1.0x"  # FedAvg against itself, seed by seed


def test_each_model_size_and_seed_has_a_section_of_its_own() -> None:
    from bench.slowlink import HIDDEN, section

    assert section(HIDDEN, 0, 1.0)[0] == "slowlink"
    assert section([1024, 1024], 0, 1.0) == (
        "slowlink-mlp-1024-1024",
        "Time to accuracy on slow links (1 Mbit/s uplink), a 1.1M-parameter MLP",
    )
    assert section([1024, 1024], 1, 1.0)[0] == "slowlink-mlp-1024-1024-seed1"


def test_context_positions_go_on_the_sparse_and_lattice_stages_only() -> None:
    from bench.slowlink import context_positions

    assert context_positions("ef:0.8 | stc:0.02 | entropy") == "ef:0.8 | stc:0.02,positions=context | entropy"
    assert (
        context_positions("residual | lattice:0.003 | entropy")
        == "residual | lattice:0.003,positions=context | entropy"
    )
