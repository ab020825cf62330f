"""Shared fixtures: free ports, subprocess helpers for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], log: Path | None = None, **kw: object) -> subprocess.Popen:
    """`python -m MODULE ARGS...`, or `python SCRIPT.py ARGS...`."""
    # Many processes share this machine's cores: one torch thread each (collaborator join reads it).
    env = {"FEDSQUEEZE_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    out = open(log, "w") if log else subprocess.PIPE
    # type: ignore[call-overload]
    return subprocess.Popen(
        [sys.executable, *([] if args[0].endswith(".py") else ["-m"]), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        **kw,
    )


def start_federation(
    tmp_path: Path, procs: list[subprocess.Popen], collaborators: int
) -> tuple[subprocess.Popen, Path]:
    """`aggregator serve` on tmp_path/plan.json and N `collaborator join` processes, all on loopback.

    Logs: agg.log and c<i>.log; reports: report.json and c<i>.json, in tmp_path. Returns (aggregator, report path)."""
    port = free_port()
    report = tmp_path / "report.json"
    agg = spawn(["fedsqueeze.aggregator", "serve", "--port", str(port), "--host", "127.0.0.1",
                 "--plan", str(tmp_path / "plan.json"), "--report", str(report)], log=tmp_path / "agg.log")  # fmt: skip
    procs.append(agg)
    for i in range(collaborators):
        procs.append(spawn(["fedsqueeze.collaborator", "join", "--server", f"127.0.0.1:{port}", "--no-progress",
                            "--report", str(tmp_path / f"c{i}.json")], log=tmp_path / f"c{i}.log"))  # fmt: skip
    return agg, report


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes started by a test; killed at the end whatever happens."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()
