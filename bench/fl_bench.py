"""Communication to target accuracy: rounds and wire bytes per codec chain, against plain FedAvg and Flower.

    python -m bench.fl_bench [--quick] [--seeds 0,1,2] [--rounds 100] [--horizon 300] [--jobs 2] [--out docs/benchmarks.md]

Protocol (issue 7): MNIST-1D (50,000 generated samples: 400 per collaborator) and digits, `mlp` with
hidden [384, 128] (66,314 parameters on MNIST-1D, 75,530 on digits); on MNIST-1D also a 1-D `cnn`,
the kind of model the data set was made to reward (conv 32 and 64 channels, hidden 256: 74,698
parameters; the mnist1d-cnn settings). 100 collaborators, Dirichlet alpha = 0.5 (and 0.1), 10
collaborators per round, 1 local epoch (batch 32, SGD lr 0.05, momentum 0.9), seeds 0, 1, 2.

Every run drives the production `Federation` in-process (`fedsqueeze.simulation`): the same codec
chains, CodecStates, training function and streaming FedAvg as `aggregator serve` with
`collaborator join` processes, and byte counts that are the serialized `Payload` sizes (checked
against a real gRPC run by `bench.grpc_check`).

Target: the accuracy plain FedAvg (identity chains) reaches by round 100 (the mean over seeds of
its mean accuracy over rounds 96-100, which smooths round-to-round noise), minus 1 pp. FedAvg runs
first and fixes the target; every other chain then runs at least 100 rounds and goes on, up to the
horizon (300), until it reaches the target. A run's rounds to target is the first round whose
accuracy is >= target; its bytes to target are everything that travelled up to and including that
round: prepass model downloads and decoder uploads included.

Chains are data (`CHAINS`): a chain whose codec is not registered in this checkout is reported and
skipped. Results per run are cached as JSON under runs/bench/fl/ (`--reuse` reads them back).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import chain_label, replace_section, split_cached
from .common import md_code as code

ROOT = Path(__file__).resolve().parents[1]
FLOWER_PY = ROOT / "bench" / "flower" / ".venv" / "bin" / "python"
CACHE = ROOT / "runs" / "bench" / "fl"
MLP: dict[str, Any] = {"name": "mlp", "args": {"hidden": [384, 128]}}
# MNIST-1D was made so that a model with a spatial bias learns what an MLP cannot (its authors' strong baseline is a
# CNN): a 1-D CNN sized to the 50-100k parameters.
CNN: dict[str, Any] = {"name": "cnn", "args": {"channels": [32, 64], "hidden": 256}}
TRAINING = {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}

DEFAULT_DOWN = "residual | topk:0.05 | quantize:8 | entropy"
LM_DOWN = "residual | topk:0.1 | quantize:8 | entropy"
CONTEXT = "positions=context"
AE_BASE = {"enabled": True, "epochs": 3, "snapshot_every": "batch", "what": "update", "variant": "chunked", "chunk": 1024,
           "latent": 16, "bits": 8, "correction": 0.002, "ae_epochs": 10, "ae_lr": 0.001}  # fmt: skip


@dataclass
class Chain:
    name: str
    up: str
    down: str = "identity"
    prepass: dict[str, Any] | None = None
    group: str = "main"  # main: the list | search: candidates for the best chain
    settings: tuple[str, ...] = ("mnist1d-a0.5",)  # where it runs; "*": everywhere
    max_seeds: int = 0  # run only the first N seeds (0: all); the AE rows, whose prepass is slow on 2 cores
    update: str | None = None  # downlink.update_chain: the aggregator's own compression of the global update
    # downlink.prior: "initial" starts a residual downlink from the initial model both sides build
    prior: str = "none"
    server_optimizer: dict[str, Any] | None = None  # aggregation.server_optimizer (None: FedAvg's plain step)

    @property
    def fedadam(self) -> bool:
        """Whether the aggregator runs FedAdam (these rows are also measured against Flower's FedAdam)."""
        return (self.server_optimizer or {}).get("name") == "adam"


# The list, then the search for the best chain. Uplink-only rows keep the downlink uncompressed.
CATCH_UP = "residual | lattice:0.0005 | entropy"  # the downlink that pairs with an aggregator update chain
# FedAdam as the E-G rows use it (Flower's FedAdam peer gets the same)
ADAM: dict[str, Any] = {
    "name": "adam",
    "lr": 0.03,
}


def resolved(server_optimizer: dict[str, Any]) -> dict[str, Any]:
    """Every field of a server optimizer section, defaults filled in from the plan's ServerOptimizerSpec."""
    from fedsqueeze.plan import ServerOptimizerSpec

    return dataclasses.asdict(ServerOptimizerSpec(**server_optimizer))


# the H rows: less momentum suits sparse, error-fed-back updates
ADAM_B05: dict[str, Any] = {
    **ADAM,
    "beta1": 0.5,
}
ADAM_LM: dict[str, Any] = {**ADAM, "lr": 0.003}  # FedAdam for the transformer (and its Flower peer)
TOPK1_Q4 = "ef | topk:0.01 | quantize:4 | entropy"
MAIN = ("mnist1d-a0.5", "mnist1d-cnn-a0.5")  # the chains: MNIST-1D alpha 0.5 with both models
LM = "stdlib-lm"  # the transformer language model
MLP_ALL = ("mnist1d-a0.5", "mnist1d-a0.1", "digits-a0.5")  # the search rows that ran in every MLP setting
CNN_ALL = ("mnist1d-cnn-a0.5", "mnist1d-cnn-a0.1")
CHAINS: list[Chain] = [
    Chain("FedAvg (identity)", "identity", "identity", settings=("*",)),
    Chain("fp16", "fp16", "fp16", settings=MAIN),
    Chain("top-k 1% + EF", "ef | topk:0.01", settings=(*MAIN, LM)),
    Chain("STC 1% + EF", "ef | stc:0.01 | entropy", settings=(*MAIN, LM)),
    Chain("QSGD 4 levels", "qsgd:4 | entropy", settings=(*MAIN, LM)),
    Chain("sign + EF", "ef | sign", settings=(*MAIN, LM)),
    Chain("PowerSGD rank 2 + EF", "ef | powersgd:2", settings=(*MAIN, LM)),
    Chain("ResFed (default chains)", TOPK1_Q4, DEFAULT_DOWN, settings=("*",)),
    # The language model: the plan of examples/stdlib_lm (denser top-k, a residual downlink from the initial model),
    # and the same downlink under STC.
    Chain(
        "L1 stdlib example's plan",
        "ef | topk:0.05 | quantize:4 | entropy",
        LM_DOWN,
        prior="initial",
        group="search",
        settings=(LM,),
    ),
    Chain(
        "L2 STC 1% + EF / L1's downlink",
        "ef | stc:0.01 | entropy",
        LM_DOWN,
        prior="initial",
        group="search",
        settings=(LM,),
    ),
    # FedAdam with a server step for the transformer's scale (weights of std 0.02-0.09; the MLPs' lr 0.03 is a third
    # of them), and the H3 recipe carried over: its lattice step at a tenth, like the server lr.
    Chain(
        "L3 FedAdam (lr 0.003), identity",
        "identity",
        "identity",
        server_optimizer=ADAM_LM,
        group="search",
        settings=(LM,),
    ),
    Chain(
        "L4 = H3 for the LM (lattice step 0.01, FedAdam lr 0.003)",
        f"ef:0.8 | stc:0.005,{CONTEXT} | entropy",
        f"residual | lattice:0.01,{CONTEXT} | entropy",
        prior="initial",
        server_optimizer={**ADAM_LM, "beta1": 0.5},
        group="search",
        settings=(LM,),
    ),
    # The AE trains an autoencoder per collaborator in the prepass (100 of them): chunked only, 1 seed, short AE training.
    # With FedAdam (seed 0, shared decoder) it peaked at 37-39 % and then fell.
    Chain(
        "AE chunked, per-collaborator decoder",
        "ae",
        "identity",
        {**AE_BASE, "decoder": "per_collaborator"},
        max_seeds=1,
        settings=MAIN,
    ),
    Chain(
        "AE chunked, shared decoder",
        "ae",
        "identity",
        {**AE_BASE, "decoder": "shared"},
        max_seeds=1,
        settings=MAIN,
    ),
    # The same AE with a 1 % correction reaches the target in every MNIST-1D setting (bench.ae_target, which
    # runs it beside its ablation at matched bytes and shares this cache)
    Chain(
        "AE chunked, shared decoder, correction 0.01",
        "ae",
        "identity",
        {**AE_BASE, "decoder": "shared", "correction": 0.01},
        max_seeds=1,
        settings=(*MLP_ALL[:2], *CNN_ALL),
    ),
    # search: the aggregator compresses its own update (update_chain) and collaborators catch up on what moved.
    # A pilot on seed 0 (300 rounds) also tried top-k 0.2 % and 0.5 % both ways, top-k 1 % up with a 0.2 %
    # update, and PowerSGD rank 2 + 8 bits: none reached the target within 300 rounds.
    Chain(
        "C1 catch-up only: identity / update top-k 5%",
        "identity",
        CATCH_UP,
        update="ef | topk:0.05",
        group="search",
    ),
    Chain(
        "C2 sign + EF / update top-k 5%",
        "ef | sign",
        CATCH_UP,
        update="ef | topk:0.05",
        group="search",
        settings=MLP_ALL,
    ),
    Chain(
        "C3 top-k 5% q4 / update top-k 5%",
        "ef | topk:0.05 | quantize:4 | entropy",
        CATCH_UP,
        update="ef | topk:0.05",
        group="search",
    ),
    Chain(
        "C4 top-k 1% q4 / update top-k 1%",
        TOPK1_Q4,
        CATCH_UP,
        update="ef | topk:0.01",
        group="search",
        settings=MLP_ALL,
    ),
    Chain("C5 top-k 1% q4 / identity", TOPK1_Q4, "identity", group="search", settings=MLP_ALL),
    Chain("C6 STC 1% / ResFed downlink", "ef | stc:0.01 | entropy", DEFAULT_DOWN, group="search"),
    Chain(
        "C7 top-k 1% q4 / update top-k 1%, step 0.002",
        TOPK1_Q4,
        "residual | lattice:0.002 | entropy",
        update="ef | topk:0.01",
        group="search",
    ),
    Chain(
        "C8 STC 1% / update top-k 1%, step 0.002",
        "ef | stc:0.01 | entropy",
        "residual | lattice:0.002 | entropy",
        update="ef | topk:0.01",
        group="search",
    ),
    # downlink.prior "initial": each collaborator's first download is the change since round 0, not the model.
    Chain(
        "D1 = C1 + initial-model prior",
        "identity",
        CATCH_UP,
        update="ef | topk:0.05",
        prior="initial",
        group="search",
    ),
    Chain(
        "D2 = C6 + initial-model prior",
        "ef | stc:0.01 | entropy",
        DEFAULT_DOWN,
        prior="initial",
        group="search",
    ),
    Chain(
        "D3 = C8 + initial-model prior",
        "ef | stc:0.01 | entropy",
        "residual | lattice:0.002 | entropy",
        update="ef | topk:0.01",
        prior="initial",
        group="search",
        settings=MLP_ALL,
    ),
    # aggregation.server_optimizer: FedAdam alone (uncompressed), then with near-lossless uplinks. On seed 0,
    # STC + FedAvgM diverged, and QSGD or sign + FedAdam with the ResFed downlink missed the target by round 300.
    Chain(
        "E1 FedAdam (lr 0.03), identity",
        "identity",
        "identity",
        server_optimizer=ADAM,
        group="search",
        settings=MAIN,
    ),
    Chain(
        "E2 QSGD 4 levels + FedAdam", "qsgd:4 | entropy", "identity", server_optimizer=ADAM, group="search"
    ),
    Chain("E3 sign + EF + FedAdam", "ef | sign", "identity", server_optimizer=ADAM, group="search"),
    # FedAdam with sparse uplinks: Adam's per-coordinate scaling gives the coordinates that the sparse updates
    # rarely carry full-size steps. A pilot on seed 0 (FedAdam, identity downlink): STC 0.2 % and 0.1 % missed the
    # target by round 250 (60 % and 51 %); lr 0.1 diverged; tau 0.01 or 1e-4 and beta1 0.95 took more rounds.
    # Any compressed downlink undid the gain: Adam moves every coordinate by about lr each round, so the
    # aggregator's update chain (top-k 1 % or 0.5 %, catch-up downlink) held the model back (61 % and 54 % by
    # round 250), and the ResFed downlink peaked at 64 %.
    Chain(
        "F1 STC 1% + EF + FedAdam",
        "ef | stc:0.01 | entropy",
        "identity",
        server_optimizer=ADAM,
        group="search",
    ),
    Chain(
        "F2 STC 0.5% + EF + FedAdam",
        "ef | stc:0.005 | entropy",
        "identity",
        server_optimizer=ADAM,
        group="search",
        settings=MLP_ALL,
    ),
    # A dense catch-up downlink does keep FedAdam's pace: no update chain, only a coarse lattice whose step is
    # about Adam's per-round move (lr 0.03), so a coordinate costs ~1 bit per download and a collaborator's model
    # stays within half a step of the global one. Step chosen on seed 0 (0.002: 6.7x down, 0.01: 10.8x, 0.02:
    # 14.4x, 0.03: 17.2x, 0.04: 16x with more rounds).
    Chain(
        "G1 = F2 / dense catch-up, step 0.02 + prior",
        "ef | stc:0.005 | entropy",
        "residual | lattice:0.02 | entropy",
        prior="initial",
        server_optimizer=ADAM,
        group="search",
    ),
    Chain(
        "G2 = F2 / dense catch-up, step 0.03 + prior",
        "ef | stc:0.005 | entropy",
        "residual | lattice:0.03 | entropy",
        prior="initial",
        server_optimizer=ADAM,
        group="search",
        settings=MLP_ALL,
    ),
    # Sparser still: on digits (seeds 0-2 in a pilot) STC 0.2 % reached the target in 44-52 rounds.
    Chain(
        "G3 STC 0.2% + FedAdam / dense catch-up, step 0.03 + prior",
        "ef | stc:0.002 | entropy",
        "residual | lattice:0.03 | entropy",
        prior="initial",
        server_optimizer=ADAM,
        group="search",
        settings=MLP_ALL,
    ),
    # Error feedback that forgets: memory x 0.8 per message (seed 0: 325x up / 22x down against G2's 317x / 17x).
    Chain(
        "G4 = G2 with ef decay 0.8",
        "ef:0.8 | stc:0.005 | entropy",
        "residual | lattice:0.03 | entropy",
        prior="initial",
        server_optimizer=ADAM,
        group="search",
        settings=MLP_ALL,
    ),
    # Tuned on seeds 0 and 1 of mnist1d-a0.5 (G4 as the start): Adam's beta1 0.5 (0.9: 122-134 rounds to target,
    # 0.5: 101-112, 0: 121-135; uncompressed FedAdam is slower with 0.5, so the Flower peer keeps 0.9) and a lattice
    # step of 0.1, above the weights' own scale: a coordinate is re-sent only once it has moved by 0.05, and
    # the collaborators still train well on that coarse copy (step 0.05: ~35x down, 0.1: ~44x, 0.15: ~52x with
    # more rounds, 0.2: ~56x with 136-141 rounds). Server lr 0.02, 0.04 or 0.05, beta2 0.9, ef decay 0.6 or 0.9 and
    # STC 0.4 % did no better.
    Chain(
        "H1 = G4 with beta1 0.5, step 0.1",
        "ef:0.8 | stc:0.005 | entropy",
        "residual | lattice:0.1 | entropy",
        prior="initial",
        server_optimizer=ADAM_B05,
        group="search",
        settings=MLP_ALL + ("mnist1d-cnn-a0.5",),
    ),
    Chain(
        "H2 = H1 with STC 0.2%",
        "ef:0.8 | stc:0.002 | entropy",
        "residual | lattice:0.1 | entropy",
        prior="initial",
        server_optimizer=ADAM_B05,
        group="search",
        settings=("digits-a0.5",),
    ),
    # The same messages, positions coded with row and column contexts (`positions=context`, codecs/sigmap.py):
    # lossless, so the runs are H1's and H2's round for round, in fewer bytes. Also tried on seed 0 (this stop):
    # FedYogi (107-116 rounds), beta2 0.999 (missed), top-k 0.5 % with 4 or 2 bits (114 / 135 rounds, more
    # bytes), QSGD 1 level with or without EF (missed), PowerSGD rank 1 + 4 bits (missed or diverged), an uplink
    # mask derived from the last download (missed), lattice steps 0.15 / 0.2 / 0.3 (121 / 141 / 217 rounds), a linear
    # predictor on the downlink, full or damped (60-130 % more downlink bytes), Adam moments that persist where no
    # update touched (diverged), and per-layer lattice steps (first layer x1.5 and last x2: 103 rounds on seed 0 but
    # 134 and 147 on seeds 1 and 2, against H1's 112 and 128).
    # Later pilots, on H1 (seeds 0 and 1; H1: 114 and 112 rounds): the aggregator averaging every collaborator's
    # latest update, stale ones included (MIFA: diverged with beta1 0.5, 59-66 % by round 200 with beta1 0 and
    # lr 0.005-0.02; FedVARP's correction: 155 / 148 rounds); Adam tau 0.0003 (137 / 135) and 0.003 (136 / 134,
    # and with lr 0.05: 134 / 113; lr 0.08 missed); and biclustered signs, an r x c block of top rows and columns
    # per matrix, whose positions cost r + c indices instead of one per entry (1 to 6 times STC's entry count at
    # the same or fewer bytes: 60-65 % by round 200, missed).
    Chain(
        "H3 = H1 with context-coded positions",
        f"ef:0.8 | stc:0.005,{CONTEXT} | entropy",
        f"residual | lattice:0.1,{CONTEXT} | entropy",
        prior="initial",
        server_optimizer=ADAM_B05,
        group="search",
        settings=MLP_ALL + CNN_ALL,
    ),
    Chain(
        "H4 = H2 with context-coded positions",
        f"ef:0.8 | stc:0.002,{CONTEXT} | entropy",
        f"residual | lattice:0.1,{CONTEXT} | entropy",
        prior="initial",
        server_optimizer=ADAM_B05,
        group="search",
        settings=("digits-a0.5", "mnist1d-cnn-a0.5"),
    ),
]


@dataclass(frozen=True)
class Metric:
    """What a setting's target is on: test accuracy (higher is better, target 1 pp below the reference) or
    perplexity (exp of the per-token loss; lower is better, target 2 % above the reference)."""

    name: str

    def of(self, record: dict[str, Any]) -> float:
        return float(record["accuracy"]) if self.name == "accuracy" else math.exp(record["loss"])

    def reached(self, value: float, target: float) -> bool:
        return value >= target if self.name == "accuracy" else value <= target

    def target(self, reference: float) -> float:
        return reference - 0.01 if self.name == "accuracy" else reference * 1.02

    def text(self, value: float) -> str:
        return f"{100 * value:.2f} %" if self.name == "accuracy" else f"{value:.2f}"

    @property
    def margin(self) -> str:
        return "minus 1 pp" if self.name == "accuracy" else "plus 2 %"


ACCURACY, PERPLEXITY = Metric("accuracy"), Metric("perplexity")


@dataclass
class Setting:
    key: str
    dataset: str
    alpha: float
    num_samples: int = 0  # mnist1d: samples generated (0: the standard 5,000)
    model: dict[str, Any] = field(default_factory=lambda: MLP)
    training: dict[str, Any] = field(default_factory=lambda: TRAINING)
    metric: Metric = ACCURACY
    # this setting's own protocol (Config fields: rounds, horizon, seeds, collaborators, per_round) over the defaults
    protocol: dict[str, Any] = field(default_factory=dict)
    about: str = ""  # the protocol in words, where it is not the common one
    # Flower's FedAdam peer here (the FedAdam rows of the setting use the same)
    fedadam: dict[str, Any] = field(default_factory=lambda: ADAM)

    @property
    def model_text(self) -> str:
        return f"`{self.model['name']}` " + ", ".join(f"{k} {v}" for k, v in self.model["args"].items())

    def config(self, cfg: Config, explicit: dict[str, Any] | None = None) -> Config:
        """`cfg` with this setting's own protocol, then what the command line set explicitly."""
        return dataclasses.replace(cfg, **{**self.protocol, **(explicit or {})})


# MNIST-1D with 50,000 generated samples: 400 training samples per collaborator (the standard 5,000
# leave 40, and FedAvg reaches only ~29 % by round 100, a target inside the round-to-round noise).
MNIST1D_SAMPLES = 50_000
# The transformer language model (issue 20): the `stdlib` data set's 64-byte windows of the standard library's
# sources, a window's topic its package; local Adam, a fixed number of local steps.
LM_TRAINING = {"local_epochs": 1, "local_steps": 10, "batch_size": 32, "lr": 0.002, "momentum": 0.0, "weight_decay": 0.0,
               "optimizer": "adam"}  # fmt: skip
LM_PROTOCOL = {"rounds": 30, "horizon": 60, "seeds": [0], "collaborators": 8, "per_round": 4}
LM_ABOUT = ("8 collaborators, 4 per round, each round 10 local Adam steps (lr 0.002, fresh each round) on batches of 32 "
            "random 64-byte windows of its shard; shards are a Dirichlet (alpha 0.5) split of the windows by their "
            "top-level package (184 packages, 174,937 training windows); the test set is 256 windows from every 10th "
            "file, held out. 1 seed; FedAvg runs 30 rounds, the others up to 60; the metric is the test perplexity "
            "per byte (exp of the mean next-byte loss).")  # fmt: skip
SETTINGS = [Setting("mnist1d-a0.5", "mnist1d", 0.5, MNIST1D_SAMPLES), Setting("mnist1d-a0.1", "mnist1d", 0.1, MNIST1D_SAMPLES),
            Setting("digits-a0.5", "digits", 0.5),
            Setting("mnist1d-cnn-a0.5", "mnist1d", 0.5, MNIST1D_SAMPLES, CNN), Setting("mnist1d-cnn-a0.1", "mnist1d", 0.1, MNIST1D_SAMPLES, CNN),
            Setting(LM, "stdlib", 0.5, model={"name": "transformer", "args": {"d_model": 128, "layers": 6, "heads": 4}}, training=LM_TRAINING, metric=PERPLEXITY,
                    protocol=LM_PROTOCOL, about=LM_ABOUT, fedadam=ADAM_LM)]  # fmt: skip


@dataclass
class Config:
    rounds: int = 100  # FedAvg and Flower run this many; the target is FedAvg's accuracy by then
    horizon: int = 300  # other chains run at least `rounds`, then on until the target or this many
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    collaborators: int = 100
    per_round: int = 10
    smooth: int = 5


def plan_json(setting: Setting, chain: Chain, seed: int, cfg: Config) -> dict[str, Any]:
    # (a copy in worker processes)
    rounds = cfg.rounds if chain.name == CHAINS[0].name else max(cfg.rounds, cfg.horizon)
    plan: dict[str, Any] = {
        "task": {
            "dataset": setting.dataset,
            "partition": "dirichlet",
            "alpha": setting.alpha,
            "num_samples": setting.num_samples,
        },
        "model": setting.model,
        "rounds": rounds,
        "seed": seed,
        "collaborators": {
            "min": cfg.collaborators,
            "fraction": cfg.per_round / cfg.collaborators,
            "min_per_round": cfg.per_round,
        },
        "training": setting.training,
        "uplink": {"chain": chain.up, "target": "delta"},
        "downlink": {"chain": chain.down, "update_chain": chain.update},
    }
    if chain.prepass is not None:
        plan["prepass"] = chain.prepass
    # Only when set, so that the cache keys of the rows without them stay as they were.
    if chain.prior != "none":
        plan["downlink"]["prior"] = chain.prior
    # Plain FedAvg, as Flower's peer runs it: no norm bound on the round's most influential update.
    plan["aggregation"] = {"norm_bound": None}
    if chain.server_optimizer is not None:
        plan["aggregation"]["server_optimizer"] = chain.server_optimizer
    return plan


def check_chain(chain: Chain) -> str | None:
    """None when every codec of the chain exists here; otherwise why it is skipped."""
    from fedsqueeze.plan import Plan, PlanError

    try:
        Plan.from_json(plan_json(SETTINGS[0], chain, 0, Config(rounds=1)))
    except (PlanError, Exception) as exc:  # noqa: BLE001 - any failure to build the chain means skip
        return f"{type(exc).__name__}: {exc}"
    return None


def cache_path(setting: Setting, chain: Chain, seed: int, cfg: Config, target: float | None = None) -> Path:
    plan = json.dumps(
        [plan_json(setting, chain, seed, cfg), cfg.rounds, None if target is None else round(target, 6)],
        sort_keys=True,
    )
    import hashlib

    digest = hashlib.sha256(plan.encode()).hexdigest()[:16]
    return CACHE / f"{setting.key}-s{seed}-{digest}.json"


Job = tuple[Setting, Chain, int, Config, float | None]


def run_one(args: Job) -> dict[str, Any]:
    """One federation in-process; returns per-round accuracy and bytes (also written to the cache).

    With a target, the run stops at the first round >= `cfg.rounds` by which the target has been reached
    (the round in progress is discarded), or at the horizon."""
    from fedsqueeze.plan import Plan
    from fedsqueeze.simulation import run_plan

    setting, chain, seed, cfg, target = args
    plan = Plan.from_json(plan_json(setting, chain, seed, cfg))
    reached = False

    def stop_when(record: Any) -> bool:
        nonlocal reached
        value = setting.metric.of({"accuracy": record.accuracy, "loss": record.loss})
        reached = reached or (target is not None and setting.metric.reached(value, target))
        return reached and record.round >= cfg.rounds

    res = run_plan(plan, on_round=stop_when)
    out = {
        "setting": setting.key,
        "chain": chain.name,
        "seed": seed,
        "seconds": res.seconds,
        "encode_seconds": res.encode_seconds,
        "train_seconds": res.train_seconds,
        "prepass_bytes": res.prepass_bytes,
        "parameters": res.report["model"]["parameters"],
        "raw_bytes": res.report["model"]["raw_bytes"],
        "rounds": [
            {"round": r["round"], "accuracy": r["accuracy"], "loss": r["loss"], **r["bytes"]}
            for r in res.rounds
        ],
    }
    path = cache_path(setting, chain, seed, cfg, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


# -- Flower ----------------------------------------------------------------------------------------------
def selection(seed: int, rounds: int, n: int, per_round: int) -> np.ndarray:
    """The shards Federation._select picks each round (ids sort in join order = shard order)."""
    k = min(n, max(per_round, math.ceil((per_round / n) * n)))
    return np.stack(
        [
            np.sort(np.random.default_rng([seed, r]).choice(n, size=k, replace=False))
            for r in range(1, rounds + 1)
        ]
    )


def flower_cache_path(
    setting: Setting, seed: int, cfg: Config, server_optimizer: dict[str, Any] | None
) -> Path:
    """Where a Flower run is kept: named by everything its task file holds."""
    import hashlib

    task = [setting.dataset, setting.alpha, setting.num_samples, setting.model, setting.training, seed, cfg.rounds,
            cfg.collaborators, cfg.per_round, server_optimizer and resolved(server_optimizer)]  # fmt: skip
    digest = hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()[:16]
    return CACHE / f"flower-{setting.key}-s{seed}-{digest}.json"


def run_flower(
    setting: Setting,
    seed: int,
    cfg: Config,
    server_optimizer: dict[str, Any] | None = None,
    reuse: bool = False,
) -> dict[str, Any] | None:
    """Flower's FedAvg, or with `server_optimizer` (adam) Flower's FedAdam, on the same task; None without its venv.
    Each run is kept under runs/bench/fl/; `reuse` reads a kept one back."""
    import torch

    from fedsqueeze.models import build_model
    from fedsqueeze.tasks import load_dataset, partition

    kept = flower_cache_path(setting, seed, cfg, server_optimizer)
    if reuse and kept.exists():
        return json.loads(kept.read_text())  # type: ignore[no-any-return]
    if not FLOWER_PY.exists():
        return None
    data = load_dataset(setting.dataset, None, seed, setting.num_samples)
    shards = partition(data.partition_labels, cfg.collaborators, "dirichlet", setting.alpha, seed)
    model = build_model(
        setting.model["name"], data.input_shape, data.num_classes, setting.model["args"], seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        task, model_file, out = Path(tmp, "task.npz"), Path(tmp, "model.pt"), Path(tmp, "out.json")
        np.savez(task, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test,
                 shard_indices=np.concatenate(shards), shard_offsets=np.cumsum([0] + [len(s) for s in shards]),
                 selection=selection(seed, cfg.rounds, cfg.collaborators, cfg.per_round),
                 meta=json.dumps({**setting.training, "seed": seed, "server_optimizer": server_optimizer and resolved(server_optimizer)}))  # fmt: skip
        torch.jit.save(torch.jit.script(model), str(model_file))  # TorchScript: no pickled code to load back
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.run([str(FLOWER_PY), str(ROOT / "bench/flower/flower_fedavg.py"), str(task), str(model_file), str(out)],
                              capture_output=True, text=True, env=env, timeout=1800)  # fmt: skip
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise RuntimeError(f"flower run failed for {setting.key} seed {seed}")
        result: dict[str, Any] = json.loads(out.read_text())
    result.update(setting=setting.key, seed=seed)
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(result))
    return result


# -- analysis --------------------------------------------------------------------------------------------
def smoothed_final(rounds: list[dict[str, Any]], k: int, metric: Metric = ACCURACY) -> float:
    return float(np.mean([metric.of(r) for r in rounds[-k:]]))


def target_of(base: list[dict[str, Any]], cfg: Config, metric: Metric = ACCURACY) -> tuple[float, float]:
    """(FedAvg's metric by round `cfg.rounds`, the target): mean over seeds of the mean of its last `smooth` rounds;
    minus 1 pp (accuracy) or plus 2 % (perplexity)."""
    ref = statistics.mean(smoothed_final(r["rounds"][: cfg.rounds], cfg.smooth, metric) for r in base)
    return ref, metric.target(ref)


def to_target(run: dict[str, Any], target: float, metric: Metric = ACCURACY) -> dict[str, Any] | None:
    """Rounds and cumulative bytes up to the first round that reaches the target."""
    pre = run.get("prepass_bytes") or {}
    up = pre.get("up_wire", 0)
    down = pre.get("down_wire", 0)
    dec = pre.get("decoder", 0)
    for r in run["rounds"]:
        up += r.get("up_wire", r.get("up_bytes", 0))
        down += r.get("down_wire", r.get("down_bytes", 0))
        dec += r.get("decoder", 0)
        if metric.reached(metric.of(r), target):
            return {"rounds": r["round"], "up": up + dec, "down": down, "decoder": dec}
    return None


def cumulative(run: dict[str, Any], metric: Metric = ACCURACY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pre = run.get("prepass_bytes") or {}
    up = (
        np.cumsum([r.get("up_wire", r.get("up_bytes", 0)) + r.get("decoder", 0) for r in run["rounds"]])
        + pre.get("up_wire", 0)
        + pre.get("decoder", 0)
    )
    down = np.cumsum([r.get("down_wire", r.get("down_bytes", 0)) for r in run["rounds"]]) + pre.get(
        "down_wire", 0
    )
    acc = np.array([metric.of(r) for r in run["rounds"]])
    return up, down, acc


def up_label(chain: Chain, code: Callable[[str], str] = code) -> str:
    return chain_label(chain.up, server_optimizer=chain.server_optimizer, code=code)


def down_label(chain: Chain, code: Callable[[str], str] = code) -> str:
    return chain_label(chain.down, update=chain.update, prior=chain.prior, code=code)


def fmt_bytes(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}x"
    return f"{x:.3g}x"


def peer_to_target(flower: list[dict[str, Any]], target: float, metric: Metric = ACCURACY) -> tuple[list[dict[str, Any]], float, float]:  # fmt: skip
    """The Flower runs that reached the target, and their mean uplink and downlink bytes to it."""
    ok = [t for t in (to_target(f, target, metric) for f in flower) if t is not None]
    if not ok:
        return ok, float("nan"), float("nan")
    return ok, statistics.mean(t["up"] for t in ok), statistics.mean(t["down"] for t in ok)


def summarise(setting: Setting, runs: dict[str, list[dict[str, Any]]], flower: list[dict[str, Any]], cfg: Config,
              skipped: dict[str, str], flower_adam: list[dict[str, Any]] | None = None) -> tuple[list[str], dict[str, Any]]:  # fmt: skip
    base = runs.get(CHAINS[0].name, [])
    metric = setting.metric
    ref, target = target_of(base, cfg, metric)
    flower_ok, fl_up, fl_down = peer_to_target(flower, target, metric)
    adam_ok, adam_up, adam_down = peer_to_target(flower_adam or [], target, metric)
    lines = [
        f"**{setting.key}**: {setting.dataset}, model {setting.model_text}, Dirichlet alpha = {setting.alpha}. "
        + (f"{setting.about} " if setting.about else "")
        + f"FedAvg's {metric.name} by round {cfg.rounds} "
        f"(mean of the last {cfg.smooth} rounds, mean of {len(base)} seeds): {metric.text(ref)}; **target {metric.text(target)}** ({metric.margin}).",
        "",
        "| chain | uplink | downlink | seeds at target | rounds to target | uplink bytes to target | downlink bytes to target | "
        f"up ÷ Flower | down ÷ Flower | Flower ÷ ours (up / down) | {metric.name} by round {cfg.rounds} | sim s/run |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    summary: dict[str, Any] = {"target": target, "reference": ref, "rows": []}
    if flower:
        f_final = [smoothed_final(f["rounds"][: cfg.rounds], cfg.smooth, metric) for f in flower]
        rt = [t["rounds"] for t in flower_ok]
        lines.append(
            f"| **Flower FedAvg** (flwr {flower[0].get('flwr')}, `ndarrays_to_parameters`) | .npy per tensor | .npy per tensor | "
            f"{len(flower_ok)}/{len(flower)} | {statistics.mean(rt):.1f} | {fmt_bytes(fl_up)} | {fmt_bytes(fl_down)} | 1 | 1 | 1 / 1 | "
            f"{metric.text(statistics.mean(f_final))} | {statistics.mean(f['seconds'] for f in flower):.0f} |"
            if rt
            else f"| Flower FedAvg | | | 0/{len(flower)} | - | - | - | | | | |"
        )
    if flower_adam:
        a_final = [smoothed_final(f["rounds"][: cfg.rounds], cfg.smooth, metric) for f in flower_adam]
        vs = (f"{adam_up / fl_up:.2e} | {adam_down / fl_down:.2e} | {fmt_ratio(fl_up / adam_up)} / {fmt_ratio(fl_down / adam_down)}"
              if adam_ok and flower_ok else "- | - | -")  # fmt: skip
        peer = resolved(setting.fedadam)
        lines.append(
            f"| **Flower FedAdam** (lr {peer['lr']}, beta1 {peer['beta1']}, Flower's `FedAdam.aggregate_fit`; its weights are float64) | .npy per tensor | "
            ".npy per tensor | "
            f"{len(adam_ok)}/{len(flower_adam)} | "
            + (
                f"{statistics.mean(t['rounds'] for t in adam_ok):.1f} | {fmt_bytes(adam_up)} | {fmt_bytes(adam_down)} | "
                if adam_ok
                else "- | - | - | "
            )
            + f"{vs} | {metric.text(statistics.mean(a_final))} | {statistics.mean(f['seconds'] for f in flower_adam):.0f} |"
        )
    for chain in CHAINS:
        if chain.name in skipped and setting.key == SETTINGS[0].key:
            lines.append(
                f"| {chain.name} | {up_label(chain)} | {down_label(chain)} | skipped: {skipped[chain.name][:80]} | | | | | | | | |"
            )
            continue
        rs = runs.get(chain.name)
        if not rs:
            continue
        tts = [to_target(r, target, metric) for r in rs]
        ok = [t for t in tts if t is not None]
        final = [smoothed_final(r["rounds"][: cfg.rounds], cfg.smooth, metric) for r in rs]
        row: dict[str, Any] = {"chain": chain.name, "up_chain": up_label(chain, str), "down_chain": down_label(chain, str),
                               "group": chain.group,
                               "reached": len(ok), "seeds": len(rs), "final": statistics.mean(final)}  # fmt: skip
        if ok:
            up = statistics.mean(t["up"] for t in ok)
            down = statistics.mean(t["down"] for t in ok)
            rounds = statistics.mean(t["rounds"] for t in ok)
            row.update(rounds=rounds, up=up, down=down, decoder=statistics.mean(t["decoder"] for t in ok))
            if flower_ok:
                row.update(up_vs_flower=up / fl_up, down_vs_flower=down / fl_down)
            # A chain with FedAdam on the aggregator is also measured against Flower's FedAdam.
            vs_adam = adam_ok and chain.fedadam
            if vs_adam:
                row.update(up_vs_flower_adam=up / adam_up, down_vs_flower_adam=down / adam_down)
            rest = (
                f"{rounds:.1f} | {fmt_bytes(up)} | {fmt_bytes(down)} | "
                + (
                    f"{up / fl_up:.2e} | {down / fl_down:.2e} | {fmt_ratio(fl_up / up)} / {fmt_ratio(fl_down / down)}"
                    if flower_ok
                    else "- | - | -"
                )
                + (
                    f" (vs Flower FedAdam: {fmt_ratio(adam_up / up)} / {fmt_ratio(adam_down / down)})"
                    if vs_adam
                    else ""
                )
            )
        else:
            rest = "not reached | - | - | - | - | -"
        summary["rows"].append(row)
        name = f"**{chain.name}**" if chain.group == "main" else chain.name
        lines.append(
            f"| {name} | {up_label(chain)} | {down_label(chain)} | {len(ok)}/{len(rs)} | {rest} | "
            f"{metric.text(statistics.mean(final))}"
            + (f" ± {100 * statistics.pstdev(final):.1f} pp" if len(final) > 1 and metric is ACCURACY else "")
            + f" | {statistics.mean(r['seconds'] for r in rs):.0f} |"
        )
    return lines, summary


def plot(setting: Setting, runs: dict[str, list[dict[str, Any]]], flower: list[dict[str, Any]], target: float, path: Path,
         flower_adam: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(17, 5.5), sharey=True)
    series = [(c.name, runs[c.name]) for c in CHAINS if runs.get(c.name)]
    if flower_adam:
        series.insert(0, ("Flower FedAdam", flower_adam))
    if flower:
        series.insert(0, ("Flower FedAvg", flower))
    for i, (name, rs) in enumerate(series):
        ups, downs, accs = zip(*(cumulative(r, setting.metric) for r in rs), strict=True)
        n = min(len(a) for a in accs)
        up = np.mean([u[:n] for u in ups], axis=0)
        down = np.mean([d[:n] for d in downs], axis=0)
        acc = np.mean([a[:n] for a in accs], axis=0)
        style: dict[str, Any] = (
            {
                "linestyle": (0, (4, 3)) if name == "Flower FedAvg" else (0, (1, 1)),
                "color": "black",
                "linewidth": 2.0,
                "zorder": 5,
            }
            if name.startswith("Flower")
            else {  # fmt: skip
                "color": plt.cm.tab20(i % 20),
                "linestyle": "-" if i < 11 else "-.",
                "linewidth": 1.2,
            }
        )
        axes[0].plot(up, acc, label=name, **style)
        axes[1].plot(down, acc, label=name, **style)
    for ax, what in zip(axes, ("uplink (decoder uploads included)", "downlink"), strict=True):
        ax.set_xscale("log")
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"cumulative {what} wire bytes, all collaborators")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"test {setting.metric.name} (mean over seeds)")
    if setting.metric is PERPLEXITY:
        axes[0].set_yscale("log")
    fig.legend(
        *axes[0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(0.78, 0.5)
    )
    fig.suptitle(f"{setting.metric.name.capitalize()} vs cumulative bytes: {setting.key} (dotted: target)")
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def protocol_text(cfg: Config, only_lm: bool) -> str:
    """The protocol paragraph: the small models' set-up (unless only the LM setting ran), then what every run shares."""
    peer = resolved(ADAM)  # Flower's FedAdam settings, as the protocol text names them
    small = (
        "Protocol: model `mlp` hidden [384, 128] (66,314 parameters on MNIST-1D, 75,530 on digits), and in the mnist1d-cnn settings "
        f"a 1-D `cnn`, the kind of model MNIST-1D was made to reward (two conv layers of 32 and 64 channels, a hidden layer of 256: 74,698 parameters), {cfg.collaborators} collaborators, "
        f"{cfg.per_round} per round, 1 local epoch (batch 32, SGD lr 0.05, momentum 0.9), seeds {cfg.seeds}. "
        f"MNIST-1D is generated with {MNIST1D_SAMPLES:,} samples (80 % train: 400 per collaborator). FedAvg and Flower run "
        f"{cfg.rounds} rounds; every other chain runs at least {cfg.rounds} rounds and then on, up to {cfg.horizon}, until it "
        "reaches the target, so slower chains still get a rounds-to-target (the accuracy column is at round "
        f"{cfg.rounds} for all). Downlink `{CATCH_UP}` with an `update` is the aggregator compressing its own global update "
        "(`downlink.update_chain`, server-side error feedback) and each collaborator catching up on the coordinates that moved. "
    )
    shared = (
        "Each run drives the production `Federation` in-process (`simulation/inprocess.py`): same chains, CodecStates, training "
        "function and streaming FedAvg as over gRPC, and bytes that are the serialized `Payload` sizes (see the gRPC check). "
        "Rounds and bytes to target are means over the seeds that reached it; bytes are totals over all collaborators"
        + (
            ""
            if only_lm
            else ", the AE's prepass model downloads and decoder uploads included (uplink column)"
        )
        + ". Flower: flwr 1.41 in its own venv (`make flower-venv`), the same data, shards, per-round selection, initial model, "
        "training function and seeds, `FedAvg.aggregate_fit` (and, where a row uses FedAdam, `FedAdam.aggregate_fit` with "
        + (
            "the setting's FedAdam parameters, given with its table"
            if only_lm
            else f"the E-G rows' lr {peer['lr']}, beta1 {peer['beta1']}, beta2 {peer['beta2']} and tau {peer['tau']}, as the peer for every FedAdam row"
        )
        + "); its bytes are the `Parameters` tensors that `ndarrays_to_parameters` produces (one .npy per tensor), "
        "downlink once per selected client. "
        "`up ÷ Flower` is our uplink bytes to target divided by Flower's (smaller is better); the next column is its inverse. "
    )
    if only_lm:
        return f"Protocol: {shared}The {LM} setting's model, data split and rounds are given with its table."
    return (
        small
        + shared
        + f"The {LM} setting (a transformer language model) has a protocol of its own, given with its table."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="development: 15 rounds, 1 seed, 20 collaborators (5 per round), main setting only",
    )
    parser.add_argument("--rounds", type=int)
    parser.add_argument(
        "--horizon",
        type=int,
        help="most rounds a chain other than FedAvg may take to reach the target (default 300)",
    )
    parser.add_argument("--seeds")
    parser.add_argument("--collaborators", type=int)
    parser.add_argument("--per-round", type=int)
    parser.add_argument("--settings", help="comma-separated setting keys (default: all)")
    parser.add_argument(
        "--chains", help="comma-separated substrings of chain names to run (FedAvg always runs)"
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--reuse", action="store_true", help="read cached runs from runs/bench/fl/ when present"
    )
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--plots", default="docs")
    args = parser.parse_args(argv)
    cfg = Config()
    settings = SETTINGS
    if args.quick:
        cfg = Config(rounds=15, horizon=30, seeds=[0], collaborators=20, per_round=5)
        settings = SETTINGS[:1]
    explicit: dict[str, Any] = {}  # over every setting's own protocol
    if args.rounds:
        explicit["rounds"] = args.rounds
    if args.horizon:
        explicit["horizon"] = args.horizon
    if args.seeds:
        explicit["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.collaborators:
        explicit["collaborators"] = args.collaborators
    if args.per_round:
        explicit["per_round"] = args.per_round
    cfg = dataclasses.replace(cfg, **explicit)
    if args.settings:
        settings = [s for s in SETTINGS if s.key in args.settings.split(",")]
    wanted = [w.strip() for w in args.chains.split(",")] if args.chains else None
    skipped = {c.name: why for c in CHAINS if (why := check_chain(c)) is not None}
    for name, why in skipped.items():
        print(f"skip {name}: {why}")
    plan_runs: list[tuple[Setting, Chain, int]] = []
    for s in settings:
        for c in CHAINS:
            if c.name in skipped or not ("*" in c.settings or s.key in c.settings):
                continue
            if wanted and c is not CHAINS[0] and not any(w in c.name for w in wanted):
                continue
            seeds = s.config(cfg, explicit).seeds
            seeds = seeds[: c.max_seeds] if c.max_seeds else seeds
            plan_runs.extend((s, c, seed) for seed in seeds)
    results: list[dict[str, Any]] = []
    cached = 0
    t0 = time.perf_counter()

    def execute(jobs: list[Job]) -> None:
        nonlocal cached
        done, todo = split_cached(jobs, lambda j: cache_path(*j), args.reuse)
        results.extend(out for _, out in done)
        cached += len(done)
        print(f"{len(jobs)} runs ({len(jobs) - len(todo)} cached), {args.jobs} processes", flush=True)
        with ProcessPoolExecutor(
            max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            for out in pool.map(run_one, todo):
                r = out["rounds"][-1]
                metric = next(s.metric for s in settings if s.key == out["setting"])
                print(f"  {out['setting']:<13} {out['chain']:<46} seed {out['seed']}  round {r['round']}: {metric.name} {metric.text(metric.of(r))}  "
                      f"{out['seconds']:.0f} s", flush=True)  # fmt: skip
                results.append(out)

    # Phase 1: FedAvg fixes each setting's target; phase 2: every other chain runs against it.
    execute([(s, c, seed, s.config(cfg, explicit), None) for s, c, seed in plan_runs if c is CHAINS[0]])
    targets = {}
    for s in settings:
        base = [r for r in results if r["setting"] == s.key and r["chain"] == CHAINS[0].name]
        if base:
            targets[s.key] = target_of(base, s.config(cfg, explicit), s.metric)[1]
    execute(
        [
            (s, c, seed, s.config(cfg, explicit), targets[s.key])
            for s, c, seed in plan_runs
            if c is not CHAINS[0] and s.key in targets
        ]
    )
    jobs = plan_runs
    flower: dict[str, list[dict[str, Any]]] = {}
    flower_adam: dict[str, list[dict[str, Any]]] = {}
    if not args.no_flower:
        if not FLOWER_PY.exists():
            print("Flower venv missing (make flower-venv): the Flower columns are left out")
        else:
            # Flower's FedAdam too, where a chain with FedAdam ran: the peer for the server optimizer.
            with_adam = {s.key for s, c, _ in plan_runs if c.fedadam}
            for s in settings:
                for seed in s.config(cfg, explicit).seeds:
                    for opt, into in (
                        (None, flower),
                        *(((s.fedadam, flower_adam),) if s.key in with_adam else ()),
                    ):
                        f = run_flower(s, seed, s.config(cfg, explicit), opt, reuse=args.reuse)
                        if f is not None:
                            into.setdefault(s.key, []).append(f)
                            print(f"  flower {f.get('strategy', 'FedAvg')} {s.key} seed {seed}: final {s.metric.name} "
                                  f"{s.metric.text(s.metric.of(f['rounds'][-1]))}  {f['seconds']:.0f} s", flush=True)  # fmt: skip
    wall = time.perf_counter() - t0
    body = [
        f"Command: `{' '.join(['python -m bench.fl_bench', *(argv if argv is not None else sys.argv[1:])])}` "
        f"({wall / 60:.1f} min wall on this 2-core machine, {args.jobs} processes"
        + (
            f"; {cached} of {len(jobs)} runs read from the cache of identical earlier runs (`--reuse`), Flower's too where kept"
            if cached
            else ""
        )
        + ").",
        "",
        protocol_text(cfg, only_lm=all(s.key == LM for s in settings)),
        "",
    ]
    summaries = {}
    for s in settings:
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in results:
            if r["setting"] == s.key:
                runs.setdefault(r["chain"], []).append(r)
        if CHAINS[0].name not in runs:
            continue
        lines, summary = summarise(
            s, runs, flower.get(s.key, []), s.config(cfg, explicit), skipped, flower_adam.get(s.key)
        )
        summaries[s.key] = summary
        png = Path(args.plots) / f"bench-fl-{s.key}.png"
        plot(s, runs, flower.get(s.key, []), summary["target"], png, flower_adam.get(s.key))
        body += [*lines, "", f"![{s.metric.name} vs cumulative bytes, {s.key}]({png.name})", ""]
        print("\n".join(lines))
    best_lines = best_verdict(summaries)
    body = body[:4] + ["Headline:", "", *best_lines, ""] + body[4:]
    print("\n".join(best_lines))
    # A subset of the settings gets a section of its own, so that the full run's tables stay.
    subset = "" if settings == SETTINGS else "-".join(s.key for s in settings)
    replace_section(Path(args.out), "fl-bench" + (f"-{subset}" if subset else ""),
                    "Communication to target accuracy (vs FedAvg and Flower)" + (f": {subset}" if subset else ""), body)  # fmt: skip
    Path(CACHE / "summary.json").write_text(json.dumps(summaries, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


def best_verdict(summaries: dict[str, Any]) -> list[str]:
    out = []
    for key, s in summaries.items():
        rows = [r for r in s["rows"] if r.get("up_vs_flower") and r["chain"] != CHAINS[0].name]
        full = [r for r in rows if r["reached"] == r["seeds"]]
        if full:
            # Closest to the goal: the largest min(uplink factor / 1000, downlink factor / 100).
            best = max(
                full, key=lambda r: min(1 / (1000 * r["up_vs_flower"]), 1 / (100 * r["down_vs_flower"]))
            )
            up_x, down_x = 1 / best["up_vs_flower"], 1 / best["down_vs_flower"]
            goal = "meets" if up_x >= 1000 and down_x >= 100 else "misses"
            best_adam = (f" (against Flower's FedAdam: {fmt_ratio(1 / best['up_vs_flower_adam'])} up, "
                         f"{fmt_ratio(1 / best['down_vs_flower_adam'])} down)") if "up_vs_flower_adam" in best else ""  # fmt: skip
            out.append(
                f"- **{key}, best chain** (closest to the goal, i.e. the largest min(uplink factor / 1000, downlink factor / 100), "
                f"every seed at target): {best['chain']} "
                f"(`{best['up_chain']}` / `{best['down_chain']}`): {fmt_ratio(up_x)} fewer uplink and {fmt_ratio(down_x)} fewer "
                f"downlink bytes to target than Flower's FedAvg, in {best['rounds']:.1f} rounds{best_adam}. "
                f"Goal (>= 1000x up and >= 100x down): **{goal}**."
            )
            up_best = max(full, key=lambda r: 1 / r["up_vs_flower"])
            vs_adam = (f" (against Flower's FedAdam: {fmt_ratio(1 / up_best['up_vs_flower_adam'])} up, "
                       f"{fmt_ratio(1 / up_best['down_vs_flower_adam'])} down)") if "up_vs_flower_adam" in up_best else ""  # fmt: skip
            out.append(
                f"  Most uplink savings with every seed at target: {up_best['chain']}: {fmt_ratio(1 / up_best['up_vs_flower'])} up, "
                f"{fmt_ratio(1 / up_best['down_vs_flower'])} down ({up_best['rounds']:.1f} rounds){vs_adam}."
            )
        partial = [r for r in rows if r not in full]
        if partial:
            p = max(partial, key=lambda r: 1 / r["up_vs_flower"])
            out.append(
                f"  {key}: most uplink savings in the seeds that reached the target ({p['reached']}/{p['seeds']}): {p['chain']}: "
                f"{fmt_ratio(1 / p['up_vs_flower'])} up, {fmt_ratio(1 / p['down_vs_flower'])} down ({p['rounds']:.1f} rounds)."
            )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
