"""Communication to a converged target, against Flower's best strategy on the same setting.

    python -m bench.converged [--settings mnist1d-a0.5,digits-a0.5] [--seeds 0,1,2] [--horizon 300]
                              [--jobs 2] [--reuse] [--out docs/benchmarks.md]

`bench.fl_bench`'s target is FedAvg's accuracy by round 100 minus 1 pp, which rewards whatever converges
fastest early. Here every run, ours and Flower's, goes the whole horizon (300 rounds), and each setting
gets two targets:

- **converged**: the best accuracy any uncompressed strategy reaches by the horizon (Flower's FedAvg and
  FedAdam, and ours with identity chains; mean of the last 5 rounds, mean over seeds) minus 1 pp;
- **round 100**: `bench.fl_bench`'s target, kept as a second column.

For each target, the peer is **Flower's best strategy**: of Flower's FedAvg and FedAdam, the one with the
fewest uplink bytes to that target (all its seeds at the target). Bytes to target are counted as in
`bench.fl_bench` (everything up to and including the first round at the target, means over the seeds
that reached it), and so is the protocol (100 collaborators, 10 per round, 1 local epoch, the same data,
shards, selection and initial model for Flower). The last columns are the accuracy at the horizon and its
gap to the best uncompressed strategy's: a chain that saves bytes by ending lower shows it there.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import int_list, replace_section, split_cached
from bench.fl_bench import (
    ADAM,
    CACHE,
    CHAINS,
    FLOWER_PY,
    SETTINGS,
    Chain,
    Config,
    Setting,
    cache_path,
    down_label,
    fmt_bytes,
    fmt_ratio,
    peer_to_target,
    run_flower,
    run_one,
    smoothed_final,
    target_of,
    to_target,
    up_label,
)

SMOOTH = 5
EARLY_ROUNDS = 100  # bench.fl_bench's target round
# fl_bench rows by name: the uncompressed references first, then the main baselines and the recipe
CHAIN_NAMES = [
    "FedAvg (identity)",
    "E1 FedAdam (lr 0.03), identity",
    "QSGD 4 levels",
    "E2 QSGD 4 levels + FedAdam",
    "sign + EF",
    "E3 sign + EF + FedAdam",
    "ResFed (default chains)",
    "H3 = H1 with context-coded positions",
]
UNCOMPRESSED = CHAIN_NAMES[:2]
FLOWER_STRATEGIES = {"Flower FedAvg": None, "Flower FedAdam": ADAM}

Job = tuple[
    str, Setting, Any, int, Config
]  # (kind "ours" | "flower", setting, chain or optimizer, seed, cfg)


def chains() -> list[Chain]:
    by_name = {c.name: c for c in CHAINS}
    return [by_name[n] for n in CHAIN_NAMES]


def flower_cache(setting: Setting, name: str, seed: int, cfg: Config) -> Path:
    return CACHE.parent / "converged" / f"{setting.key}-{name.replace(' ', '_')}-s{seed}-r{cfg.rounds}.json"


def run_job(job: Job) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    kind, setting, what, seed, cfg = job
    if kind == "ours":
        return run_one((setting, what, seed, cfg, None))
    name = next(n for n, opt in FLOWER_STRATEGIES.items() if opt == what)
    out = run_flower(setting, seed, cfg, what)
    if out is None:
        raise RuntimeError("Flower's venv is missing: make flower-venv")
    out["chain"] = name
    path = flower_cache(setting, name, seed, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def cached(job: Job) -> Path:
    kind, setting, what, seed, cfg = job
    if kind == "ours":
        return cache_path(setting, what, seed, cfg, None)
    name = next(n for n, opt in FLOWER_STRATEGIES.items() if opt == what)
    return flower_cache(setting, name, seed, cfg)


def final_accuracy(runs: list[dict[str, Any]]) -> float:
    return statistics.mean(smoothed_final(r["rounds"], SMOOTH) for r in runs)


def best_flower(flower: dict[str, list[dict[str, Any]]], target: float) -> tuple[str, float, float] | None:
    """(name, uplink bytes, downlink bytes) of the Flower strategy with the fewest uplink bytes to
    `target`, among those whose every seed reached it."""
    best = None
    for name, runs in flower.items():
        ok, up, down = peer_to_target(runs, target)
        if runs and len(ok) == len(runs) and (best is None or up < best[1]):
            best = (name, up, down)
    return best


def to_target_cells(runs: list[dict[str, Any]], target: float, peer: tuple[str, float, float] | None) -> tuple[str, dict[str, Any]]:  # fmt: skip
    hits = [t for t in (to_target(r, target) for r in runs) if t is not None]
    if not hits:
        return f"0/{len(runs)} | not reached | - | - | -", {"reached": 0}
    up = statistics.mean(t["up"] for t in hits)
    down = statistics.mean(t["down"] for t in hits)
    rounds = statistics.mean(t["rounds"] for t in hits)
    factors = f"{fmt_ratio(peer[1] / up)} / {fmt_ratio(peer[2] / down)}" if peer else "-"
    stats = {"reached": len(hits), "rounds": rounds, "up": up, "down": down}
    if peer:
        stats |= {"up_factor": peer[1] / up, "down_factor": peer[2] / down}
    return f"{len(hits)}/{len(runs)} | {rounds:.1f} | {fmt_bytes(up)} | {fmt_bytes(down)} | {factors}", stats


def summarise(setting: Setting, ours: dict[str, list[dict[str, Any]]], flower: dict[str, list[dict[str, Any]]],
              horizon: int) -> tuple[list[str], list[str]]:  # fmt: skip
    """The setting's table and its headline lines."""
    finals = {name: final_accuracy(runs) for name, runs in {**flower, **{n: ours[n] for n in UNCOMPRESSED if n in ours}}.items() if runs}  # fmt: skip
    best_name = max(finals, key=lambda n: finals[n])
    best = finals[best_name]
    converged = best - 0.01
    early_ref, early = target_of(ours[CHAIN_NAMES[0]], Config(rounds=EARLY_ROUNDS, smooth=SMOOTH))
    peers = {"converged": best_flower(flower, converged), "early": best_flower(flower, early)}

    def peer_text(key: str) -> str:
        p = peers[key]
        return (
            f"{p[0]} ({fmt_bytes(p[1])} up, {fmt_bytes(p[2])} down)"
            if p
            else "none of Flower's strategies reached it on every seed"
        )

    lines = [
        f"**{setting.key}** ({setting.dataset}, model {setting.model_text}, Dirichlet alpha {setting.alpha}, {len(ours[CHAIN_NAMES[0]])} seeds, "
        f"{horizon} rounds). Best uncompressed accuracy by round {horizon}: {100 * best:.2f} % ({best_name}); **converged target "
        f"{100 * converged:.2f} %**, Flower's best strategy to it: {peer_text('converged')}. Round-{EARLY_ROUNDS} target "
        f"(FedAvg's accuracy by round {EARLY_ROUNDS} minus 1 pp): {100 * early:.2f} %, Flower's best to it: {peer_text('early')}.",
        "",
        "| chain | uplink | downlink | seeds at converged target | rounds | uplink bytes | downlink bytes | Flower's best ÷ ours (up / down) "
        f"| seeds at round-{EARLY_ROUNDS} target | rounds | uplink bytes | downlink bytes | Flower's best ÷ ours (up / down) "
        f"| accuracy by round {horizon} | gap to best uncompressed |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    winners: dict[str, tuple[str, dict[str, Any]]] = {}
    rows: list[tuple[str, str, str, list[dict[str, Any]], bool]] = [
        (name, ".npy per tensor", ".npy per tensor", runs, False) for name, runs in flower.items()
    ]
    rows += [
        (c.name, up_label(c), down_label(c), ours[c.name], c.name not in UNCOMPRESSED)
        for c in chains()
        if c.name in ours
    ]
    for name, up_text, down_text, runs, compressed in rows:
        cells = []
        for key, target in (("converged", converged), ("early", early)):
            text, stats = to_target_cells(runs, target, peers[key])
            cells.append(text)
            if compressed and stats["reached"] == len(runs) and "up_factor" in stats:
                if key not in winners or stats["up_factor"] > winners[key][1]["up_factor"]:
                    winners[key] = (name, stats)
        final = final_accuracy(runs)
        label = f"**{name}**" if name.startswith("Flower") else name
        lines.append(f"| {label} | {up_text} | {down_text} | {cells[0]} | {cells[1]} | {100 * final:.2f} % | "
                     f"{100 * (final - best):+.2f} pp |")  # fmt: skip
    headline = []
    for key, title in (
        ("converged", f"converged target {100 * converged:.2f} %"),
        ("early", f"round-{EARLY_ROUNDS} target {100 * early:.2f} %"),
    ):
        peer = peers[key]
        if key in winners and peer:
            name, s = winners[key]
            headline.append(f"- **{setting.key}**, {title}: {name}, {fmt_ratio(s['up_factor'])} fewer uplink and "
                            f"{fmt_ratio(s['down_factor'])} fewer downlink bytes than {peer[0]}, in {s['rounds']:.1f} rounds.")  # fmt: skip
        else:
            headline.append(f"- **{setting.key}**, {title}: no compressed chain reached it on every seed by round {horizon}"
                            + ("" if peer else ", nor did Flower") + ".")  # fmt: skip
    return lines, headline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default="mnist1d-a0.5,digits-a0.5")
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2])
    parser.add_argument(
        "--setting-seeds",
        action="append",
        default=[],
        metavar="KEY=SEEDS",
        help="other seeds for one setting, e.g. mnist1d-cnn-a0.5=0 (repeatable)",
    )
    parser.add_argument("--horizon", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="read runs back from the cache")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file to update (e.g. docs/benchmarks.md)"
    )
    args = parser.parse_args(argv)
    if not FLOWER_PY.exists():
        print("bench.converged needs Flower's venv: make flower-venv", file=sys.stderr)
        return 2
    settings = [s for s in SETTINGS if s.key in args.settings.split(",")]
    cfg = Config(rounds=args.horizon, horizon=args.horizon, seeds=args.seeds)
    seeds = {s.key: args.seeds for s in settings}
    for item in args.setting_seeds:
        key, _, values = item.partition("=")
        seeds[key] = int_list(values)
    jobs: list[Job] = [
        ("flower", s, opt, seed, cfg)
        for s in settings
        for opt in FLOWER_STRATEGIES.values()
        for seed in seeds[s.key]
    ]
    jobs += [("ours", s, c, seed, cfg) for s in settings for c in chains() for seed in seeds[s.key]]  # fmt: skip
    results, todo = split_cached(jobs, cached, args.reuse)
    print(f"{len(jobs)} runs ({len(jobs) - len(todo)} cached), {args.jobs} processes", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, out in zip(todo, pool.map(run_job, todo), strict=True):
            print(f"  {job[1].key:<13} {out['chain']:<40} seed {job[3]}: {100 * out['rounds'][-1]['accuracy']:.1f} %  "
                  f"{out['seconds']:.0f} s", flush=True)  # fmt: skip
            results.append((job, out))
    wall = time.perf_counter() - start
    body = [
        f"Command: `python -m bench.converged --settings {args.settings} --seeds {','.join(map(str, args.seeds))} "
        + "".join(f"--setting-seeds {item} " for item in args.setting_seeds)
        + f"--horizon {args.horizon}` ({wall / 60:.1f} min wall, {args.jobs} processes"
        + (f"; {len(jobs) - len(todo)} of {len(jobs)} runs from the cache" if len(todo) < len(jobs) else "") + "). "
        f"Every run goes {args.horizon} rounds. Converged target: the best uncompressed accuracy by round {args.horizon} "
        "(Flower's FedAvg and FedAdam, our FedAvg and FedAdam with identity chains; mean of the last 5 rounds, mean over "
        f"seeds) minus 1 pp. Round-{EARLY_ROUNDS} target: `bench.fl_bench`'s. Flower's best: of Flower's FedAvg and FedAdam "
        "(lr 0.03, beta1 0.9), the one with the fewest uplink bytes to that target on every seed. Protocol, byte counting "
        "and chains as in `bench.fl_bench` (the chain names are its rows').",
        "",
    ]  # fmt: skip
    headlines: list[str] = []
    for s in settings:
        ours: dict[str, list[dict[str, Any]]] = {}
        flower: dict[str, list[dict[str, Any]]] = {}
        for job, out in results:
            if job[1].key == s.key:
                (ours if job[0] == "ours" else flower).setdefault(out["chain"], []).append(out)
        lines, headline = summarise(s, ours, flower, args.horizon)
        body += [*lines, ""]
        headlines += headline
    body = [*body[:2], "Headline (each setting's compressed chain with the largest uplink factor, every seed at the target):", "",
            *headlines, "", *body[2:]]  # fmt: skip
    print("\n".join(body))
    if args.out is not None:
        key, title = section(args.settings)
        replace_section(args.out, key, title, body)
    return 0


# the settings of docs/benchmarks.md's main converged section; any other set gets a section of its own
MAIN_SETTINGS = ("mnist1d-a0.5", "digits-a0.5", "mnist1d-cnn-a0.5")


def section(settings: str) -> tuple[str, str]:
    """(marker key, title) of the docs section for a `--settings` list, so runs of other settings add to the
    page instead of replacing the main section."""
    keys = settings.split(",")
    title = "Communication to a converged target (vs Flower's best strategy)"
    if set(keys) <= set(MAIN_SETTINGS):
        return "converged", title
    return f"converged-{'-'.join(keys)}", f"{title}: {', '.join(keys)}"


if __name__ == "__main__":
    sys.exit(main())
