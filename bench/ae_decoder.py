"""Decoder upload compression: bytes of one decoder and the AE's reconstruction before/after the decoder chain.

Shard 0 of a plan's prepass (the same snapshots and AE training as a collaborator's), then for each
decoder chain: the upload's bytes, and the NMSE of the `ae` stage's output (the AE part alone, no
sparse correction, and the whole stage) on the AE's own training updates, with the decoder as the
aggregator reads it. Run: python -m bench.ae_decoder [--plan fedsqueeze/plans/ae.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

CHAINS = [
    "",
    "bf16 | zstd",
    "quantize:8,granularity=layer | entropy",
    "quantize:4,granularity=layer | entropy",
]


def nmse(
    stage: object,
    encoder: dict[str, np.ndarray],
    decoder: dict[str, np.ndarray],
    samples: np.ndarray,
    correction: float,
) -> float:
    """Mean NMSE of the `ae` stage over `samples` (rows), sender and receiver holding `decoder`."""
    from fedsqueeze.codecs import Chain, CodecState, Layout

    assert dataclasses.is_dataclass(stage)
    config = {"id": "ae", **{f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}}
    config["correction"] = correction
    chain = Chain.from_config([config])
    layout = Layout.of({"x": np.zeros(samples.shape[1])})
    errors = []
    for row in samples:
        tx, rx = CodecState(), CodecState()
        tx.stage(0).update({**encoder, **decoder})
        rx.stage(0).update(decoder)
        enc = chain.encode(row, layout, tx)
        out = chain.decode(enc.data, layout, rx)
        errors.append(float(np.sum((out - row) ** 2) / np.sum(row**2)))
    return float(np.mean(errors))


def main(argv: list[str] | None = None) -> int:
    import torch

    from fedsqueeze.chains import LinkChains
    from fedsqueeze.codecs.autoencoder import find_stage
    from fedsqueeze.collaborator.prepass import (
        pack_decoder,
        record_snapshots,
        train_autoencoder,
        training_set,
    )
    from fedsqueeze.collaborator.round_step import prepass_seed
    from fedsqueeze.models import build_model
    from fedsqueeze.plan import Plan
    from fedsqueeze.tasks import load_plan_dataset, partition

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default=str(Path(__file__).parents[1] / "fedsqueeze" / "plans" / "ae.json"))
    ap.add_argument("--ae-epochs", type=int, default=None, help="default: the plan's")
    ap.add_argument("--samples", type=int, default=200, help="updates the NMSE is averaged over")
    ap.add_argument("--chains", nargs="*", default=CHAINS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    plan = Plan.from_json(json.loads(Path(args.plan).read_text()))
    data = load_plan_dataset(plan)
    model = build_model(plan.model.name, data.input_shape, data.num_classes, plan.model.args, plan.seed)
    idx = partition(data.partition_labels, plan.num_shards, plan.task.partition, plan.task.alpha, plan.seed)[
        0
    ]
    snaps = record_snapshots(model, data.x_train[idx], data.y_train[idx], plan, seed=prepass_seed(plan, 0))
    samples = training_set(snaps, plan, len(idx))
    found = find_stage(LinkChains.from_plan(plan).uplink)
    assert found is not None
    stage = found[1]
    n = samples.shape[1]
    enc, dec, losses = train_autoencoder(
        stage, samples, epochs=args.ae_epochs or plan.prepass.ae_epochs, lr=plan.prepass.ae_lr, seed=plan.seed
    )
    rows = samples[np.random.default_rng(0).permutation(len(samples))[: args.samples]]
    print(f"{stage.variant} AE, {n:,} parameters, {len(samples)} updates, AE loss {losses[-1]:.4g}")
    print(f"{'decoder chain':<42} {'upload bytes':>12} {'ratio':>7} {'NMSE AE part':>13} {'NMSE stage':>11}")
    raw = None
    for config in args.chains:
        blob, received = pack_decoder(stage, dec, "c0000", config, n)
        raw = raw or len(blob)
        print(f"{config or '(raw fp32 safetensors)':<42} {len(blob):>12,} {raw / len(blob):>6.1f}x "
              f"{nmse(stage, enc, received, rows, 0.0):>13.4f} {nmse(stage, enc, received, rows, stage.correction):>11.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
