"""Helpers shared by the benchmarks."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

J = TypeVar("J")

HEADER = (
    "# Benchmarks\n\nEvery table here is written by a script in `bench/`; the command is given with each.\n"
)


def int_list(text: str) -> list[int]:
    """A command-line list of integers: "0,1,2" -> [0, 1, 2]."""
    return [int(v) for v in text.split(",")]


def split_cached(
    jobs: Sequence[J], path_of: Callable[[J], Path], reuse: bool
) -> tuple[list[tuple[J, dict[str, Any]]], list[J]]:
    """(the jobs whose result file exists, with that result, read back; the jobs left to run). Without
    `reuse`, every job is left to run."""
    done: list[tuple[J, dict[str, Any]]] = []
    todo: list[J] = []
    for job in jobs:
        path = path_of(job)
        if reuse and path.exists():
            done.append((job, json.loads(path.read_text())))
        else:
            todo.append(job)
    return done, todo


def run_or_read(
    jobs: Sequence[J],
    path_of: Callable[[J], Path],
    run: Callable[[J], dict[str, Any]],
    reuse: bool,
    workers: int,
) -> tuple[list[dict[str, Any]], int]:
    """(every job's result in job order, how many were read back): `split_cached`, then the rest run by
    `run` (a module-level function, which writes its own result file) in `workers` processes."""
    from concurrent.futures import ProcessPoolExecutor

    done, todo = split_cached(jobs, path_of, reuse)
    with ProcessPoolExecutor(workers) as pool:
        ran = dict(zip(map(path_of, todo), pool.map(run, todo), strict=True))
    kept = {path_of(job): out for job, out in done}
    return [kept.get(path_of(job)) or ran[path_of(job)] for job in jobs], len(done)


def md_code(text: str) -> str:
    """Inline code for a Markdown table cell: GitHub splits cells at every unescaped `|`, even in code."""
    return "`" + text.replace("|", "\\|") + "`"


def chain_label(
    chain: str,
    *,
    update: str | None = None,
    prior: str | None = None,
    server_optimizer: dict[str, Any] | None = None,
    code: Callable[[str], str] = md_code,
) -> str:
    """A chain with its plan options: `chain` + update `U` + prior `P` + server `NAME` lr X.

    Markdown table code by default; `code=str` gives plain text (for JSON summaries)."""
    label = code(chain)
    if update:
        label += f" + update {code(update)}"
    if prior and prior != "none":
        label += f" + prior {code(prior)}"
    if server_optimizer:
        label += f" + server {code(server_optimizer['name'])} lr {server_optimizer.get('lr', 1.0)}"
        label += "".join(f", {k} {v}" for k, v in server_optimizer.items() if k not in ("name", "lr"))
    return label


def downlink_label(down: str | dict[str, Any], code: Callable[[str], str] = md_code) -> str:
    """A downlink given as a chain or as a plan's downlink section (chain, update_chain, prior)."""
    if isinstance(down, str):
        return chain_label(down, code=code)
    return chain_label(down["chain"], update=down.get("update_chain"), prior=down.get("prior"), code=code)


def replace_section(path: Path, key: str, title: str, lines: list[str]) -> None:
    """Write `lines` under `## title` between markers, keeping other benchmarks' sections."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = "\n".join([start, f"## {title}", "", *lines, end])
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
