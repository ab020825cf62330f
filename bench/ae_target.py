"""The autoencoder to `bench.fl_bench`'s target on MNIST-1D, shared decoder counted, beside its ablation.

    python -m bench.ae_target [--settings mnist1d-a0.5,...] [--correction 0.01] [--seed 0] [--jobs 2] [--reuse]
                              [--out docs/benchmarks.md]

`bench.fl_bench`'s AE rows (chunked AE, shared or per-collaborator decoder, 0.2 % sparse correction) did
not reach the target on the MNIST-1D MLP by round 300. Here the same AE (`fl_bench.AE_BASE`, shared
decoder) runs with a larger sparse correction, on `bench.fl_bench`'s protocol (100 collaborators, 10 per
round, the same data, shards and target: FedAvg's accuracy by round 100 minus 1 pp), until the target or
round 300. Every byte of the prepass is counted: the decoder upload, its download by the other
collaborators, and any re-upload.

The ablation is the same uplink with the AE part removed, the sparse correction and error feedback alone
(`ef | topk:k | sign | entropy`: the correction is sign + one shared magnitude of the residual's top
entries), with k chosen so that a message costs what the AE's messages cost on average (calibrated by
encoding a Laplace vector of the model's size; the table gives the bytes both actually sent). The AE
earns its place only if it reaches the target in fewer bytes than its ablation. Beside them, on the same
seed and target: FedAvg, and `bench.fl_bench`'s best chain (H3, the recipe).

Runs are kept in `bench.fl_bench`'s cache (runs/bench/fl/), so `--reuse` reads back FedAvg's and ours.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import replace_section, run_or_read
from .fl_bench import (
    AE_BASE,
    CHAINS,
    SETTINGS,
    Chain,
    Config,
    Job,
    Setting,
    cache_path,
    down_label,
    fmt_bytes,
    run_one,
    target_of,
    to_target,
    up_label,
)

MNIST1D = ("mnist1d-a0.5", "mnist1d-a0.1", "mnist1d-cnn-a0.5", "mnist1d-cnn-a0.1")
FEDAVG = CHAINS[0]
BEST = next(c for c in CHAINS if c.name.startswith("H3 "))  # fl_bench's fewest bytes to target: the recipe


def ae_chain(correction: float) -> Chain:
    """fl_bench's row "AE chunked, shared decoder, correction 0.01", or the same AE with another correction."""
    name = f"AE chunked, shared decoder, correction {correction:g}"
    return next((c for c in CHAINS if c.name == name), None) or Chain(
        name,
        "ae",
        "identity",
        {**AE_BASE, "decoder": "shared", "correction": correction},
        max_seeds=1,
        settings=MNIST1D,
    )


def ablation_chain(fraction: float) -> Chain:
    return Chain(f"ablation: sign top-{fraction:.3%} + EF", f"ef | topk:{fraction:.5f} | sign | entropy", "identity",
                 settings=MNIST1D)  # fmt: skip


def sign_topk_bytes(fraction: float, n: int) -> int:
    """Wire bytes of one `topk:fraction | sign | entropy` message of n Laplace-distributed entries."""
    from fedsqueeze.codecs import Chain as CodecChain
    from fedsqueeze.codecs.layout import Layout

    x = np.random.default_rng(0).laplace(size=n).astype(np.float32)
    layout = Layout.of({"update": x})
    return len(CodecChain.from_config(f"topk:{fraction:.5f} | sign | entropy").encode(x, layout).data)


def matched_fraction(message_bytes: float, n: int) -> float:
    """The top-k fraction whose sign message costs `message_bytes` (bisection in log space)."""
    lo, hi = math.log(1.0 / n), math.log(0.5)
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sign_topk_bytes(math.exp(mid), n) < message_bytes else (lo, mid)
    return round(math.exp((lo + hi) / 2), 5)


def per_message(run: dict[str, Any], per_round: int = Config.per_round) -> float:
    """Mean uplink wire bytes per message (`per_round` messages a round), prepass excluded."""
    rounds = run["rounds"]
    return float(sum(r["up_wire"] for r in rounds) / max(1, per_round * len(rounds)))


def run_all(jobs: list[Job], reuse: bool, workers: int) -> tuple[list[dict[str, Any]], int]:
    return run_or_read(jobs, lambda j: cache_path(*j), run_one, reuse, workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default=",".join(MNIST1D))
    parser.add_argument("--correction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--horizon", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="read runs back from bench.fl_bench's cache")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file to update (e.g. docs/benchmarks.md)"
    )
    args = parser.parse_args(argv)
    by_key = {s.key: s for s in SETTINGS}
    unknown = [k for k in args.settings.split(",") if k not in MNIST1D]
    if unknown:
        print(
            f"bench.ae_target: unknown setting(s) {', '.join(unknown)}; known: {', '.join(MNIST1D)}",
            file=sys.stderr,
        )
        return 2
    settings = [by_key[k] for k in args.settings.split(",")]
    cfg = Config(rounds=100, horizon=args.horizon, seeds=[args.seed])
    start = time.perf_counter()
    bases, kept_n = run_all([(s, FEDAVG, args.seed, cfg, None) for s in settings], args.reuse, args.jobs)
    targets = {s.key: target_of([b], cfg)[1] for s, b in zip(settings, bases, strict=True)}
    ae = ae_chain(args.correction)
    runs, kept = run_all([(s, c, args.seed, cfg, targets[s.key]) for s in settings for c in (ae, BEST)],
                         args.reuse, args.jobs)  # fmt: skip
    ae_runs, best_runs = runs[::2], runs[1::2]
    kept_n += kept
    ablations = [ablation_chain(matched_fraction(per_message(run), run["parameters"])) for run in ae_runs]
    ab_runs, kept = run_all([(s, c, args.seed, cfg, targets[s.key]) for s, c in zip(settings, ablations, strict=True)],
                            args.reuse, args.jobs)  # fmt: skip
    kept_n += kept
    wall = time.perf_counter() - start
    lines = [
        f"Command: `python -m bench.ae_target --settings {args.settings} --correction {args.correction:g} --seed {args.seed}` "
        f"({wall / 60:.1f} min wall, {args.jobs} processes; {kept_n} of {4 * len(settings)} runs from the cache). "
        f"`bench.fl_bench`'s protocol and target (FedAvg's accuracy by round 100 minus 1 pp), seed {args.seed}, up to round "
        f"{args.horizon}. The AE: `bench.fl_bench`'s (chunked 1024, latent 16 at 8 bits, prepass 3 epochs) with a shared "
        f"decoder and a {args.correction:.1%} sparse correction; uplink bytes to target include the prepass "
        "(decoder upload) and decoder bytes, downlink bytes the shared decoder's download by every other collaborator. "
        "Ablation: the AE's sparse correction and error feedback without the AE, k matched to the AE's bytes per message. "
        "Best chain: `bench.fl_bench`'s H3 (the recipe: STC 0.5 % with FedAdam, a lattice downlink).",
        "",
        "| setting | target | chain | uplink | downlink | B / message | rounds to target | uplink bytes to target | of which decoder | downlink bytes to target | FedAvg's uplink ÷ ours | accuracy at the last round |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for i, s in enumerate(settings):
        fedavg = to_target(bases[i], targets[s.key])
        chains = (FEDAVG, BEST, ae, ablations[i])
        for chain, run in zip(chains, (bases[i], best_runs[i], ae_runs[i], ab_runs[i]), strict=True):
            lines.append(row(s, targets[s.key], chain, run, fedavg))
    print("\n".join(lines))
    if args.out is not None:
        replace_section(
            args.out, "ae-target", "The autoencoder to target on MNIST-1D (shared decoder counted)", lines
        )
    return 0


def row(
    setting: Setting, target: float, chain: Chain, run: dict[str, Any], fedavg: dict[str, Any] | None
) -> str:
    hit = to_target(run, target)
    factor = f"{fedavg['up'] / hit['up']:,.0f}x" if (hit and fedavg) else "-"
    cells = [
        setting.key,
        f"{100 * target:.2f} %",
        chain.name,
        up_label(chain),
        down_label(chain),
        f"{per_message(run):,.0f}",
    ]
    if hit:
        cells += [str(hit["rounds"]), fmt_bytes(hit["up"]), fmt_bytes(hit["decoder"]) if hit["decoder"] else "-",
                  fmt_bytes(hit["down"]), factor]  # fmt: skip
    else:
        cells += [f"not in {len(run['rounds'])}", "-", "-", "-", "-"]
    cells.append(f"{100 * run['rounds'][-1]['accuracy']:.2f} %")
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
