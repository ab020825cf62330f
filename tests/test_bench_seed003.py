"""bench.seed003: the paper's QAT set-up (quantized models up, the float model down) and its kept runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import seed003
from bench.seed003 import FLOAT_DOWN, cache_path, plan_json, rows
from fedsqueeze.plan import Plan


def test_float_downlink_rows_quantize_the_uplink_only() -> None:
    float_rows = [row for row in rows() if row.group == "float downlink"]
    assert {row.name for row in float_rows} == {
        f"{bits}-bit {kind}, float downlink" for bits in (1, 4, 8) for kind in ("post-hoc", "QAT")
    }
    for row in float_rows:
        plan = Plan.from_json(plan_json(row, 0, 3))  # a valid plan, QAT chain included
        assert plan.downlink.chain == FLOAT_DOWN and plan.uplink.chain == row.chain != FLOAT_DOWN
        assert plan.training.qat == ("" if "post-hoc" in row.name else row.chain.removesuffix(" | zstd"))
    same_way = next(row for row in rows() if row.name == "4-bit QAT")
    assert plan_json(same_way, 0, 3)["downlink"]["chain"] == same_way.chain


def test_reuse_reads_kept_runs_and_the_table_names_each_downlink(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(seed003, "CACHE", tmp_path)
    jobs = [(row, 0, 3) for row in rows()]
    assert len({cache_path(job) for job in jobs}) == len(jobs)  # one file per plan
    for i, job in enumerate(jobs):
        kept = {"row": job[0].name, "seed": 0, "accuracy": 0.01 * i, "up_wire": 1000.0 + i,
                "down_wire": 2000.0, "raw": 298_792.0, "seconds": 60.0}  # fmt: skip
        cache_path(job).write_text(json.dumps(kept))
    assert seed003.main(["--rounds", "3", "--reuse", "--jobs", "1"]) == 0  # nothing left to run
    out = capsys.readouterr().out
    assert f"{len(jobs)} of {len(jobs)} runs kept" in out
    line = next(text for text in out.splitlines() if text.startswith("| 4-bit QAT, float downlink |"))
    assert "| `identity` |" in line and "`quantize:4,granularity=layer,grid=minmax`" in line
    assert next(text for text in out.splitlines() if text.startswith("| 4-bit QAT |")).count("| same |") == 1
