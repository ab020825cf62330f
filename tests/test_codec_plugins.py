"""Codecs from other packages: registered through the `fedsqueeze.codecs` entry-point group.

`tests/example_codec/` is such a package (`absmax8`, declared in its pyproject.toml). These tests
install it as pip would, as a dist-info on the import path, and use it in chains: in-process
against the codec contract, and in a real federation over gRPC, where the aggregator and
collaborator processes find it only through the entry point.
"""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedsqueeze.codecs import ENTRY_POINT_GROUP, Chain, CodecError, CodecState, Layout, registered_codecs

from .codecs.contract import check_chain_contract
from .conftest import start_federation

EXAMPLE = Path(__file__).parent / "example_codec"


def install_example(site: Path) -> None:
    """What `pip install tests/example_codec` puts on the path: the module and a dist-info naming its entry points."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    points = project["entry-points"][ENTRY_POINT_GROUP]
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE / "fedsqueeze_example_codec.py", site)
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{name} = {target}" for name, target in points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def example_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from fedsqueeze.codecs import base

    site = tmp_path / "site"
    install_example(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))  # for the processes the federation test starts
    yield site
    base._REGISTRY.pop("absmax8", None)  # leave the registry as the other tests expect it
    base._TRIED_ENTRY_POINTS.discard("absmax8")
    sys.modules.pop("fedsqueeze_example_codec", None)


def test_not_installed_is_an_unknown_codec() -> None:
    with pytest.raises(CodecError, match="unknown codec 'absmax8'"):
        Chain.parse("absmax8")


def test_an_installed_plugin_is_registered_and_keeps_the_codec_contract(example_installed: Path) -> None:
    assert "absmax8" in registered_codecs()
    layout = Layout.of({"w": np.zeros((30, 20)), "b": np.zeros(30)})
    for chain in ("absmax8", "absmax8 | entropy", "ef | topk:0.1 | absmax8 | entropy"):
        check_chain_contract(chain, layout)
    x = np.random.default_rng(1).standard_normal(layout.numel).astype(np.float32)
    enc = Chain.parse("absmax8 | entropy").encode(x, layout, CodecState())
    assert np.abs(enc.reconstruction - x).max() <= np.abs(x).max() / 254 * (1 + 1e-5)  # its documented bound
    assert len(enc.data) < layout.raw_bytes / 4


@pytest.mark.slow
def test_a_plugin_codec_works_in_a_federation_over_grpc(
    example_installed: Path, tmp_path: Path, procs: list
) -> None:
    plan = {"rounds": 4, "collaborators": {"min": 2, "join_timeout_s": 120}, "training": {"local_epochs": 2, "lr": 0.1},
            "uplink": {"chain": "ef | topk:0.1 | absmax8 | entropy"}, "downlink": {"chain": "residual | absmax8 | entropy"},
            "round_timeout_s": 120}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    agg, report = start_federation(tmp_path, procs, 2)
    assert agg.wait(timeout=300) == 0, (tmp_path / "agg.log").read_text()
    for p in procs[1:]:
        assert p.wait(timeout=60) == 0, (tmp_path / "c0.log").read_text()
    data = json.loads(report.read_text())
    assert "absmax8" in data["uplink_chain"] and "absmax8" in data["downlink_chain"]
    assert [r["status"] for r in data["rounds"]] == ["ok"] * 4 and all(
        r["participants"] == 2 for r in data["rounds"]
    )
    s = data["summary"]
    assert s["final_accuracy"] > 0.8
    assert s["up_ratio"] > 20 and s["down_ratio"] > 3
