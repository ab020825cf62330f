"""Seed 001 section 5.1: accuracy with the original vs the AE-reconstructed weights, per prepass snapshot (Fig. 5/7).

One collaborator's prepass (shard 0 of the plan's data set) records weight snapshots; an AE is
trained on them as in the plan (the paper's literal mode by default: the weights through a FC AE);
then every snapshot is encoded and decoded by the `ae` codec stage exactly as on the wire (quantized
latent included) and the test accuracy of both weight sets is printed and plotted.

    python -m bench.ae_validation [--plan fedsqueeze/plans/ae-paper.json] [--out runs/ae-validation.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import torch

    from fedsqueeze.chains import LinkChains
    from fedsqueeze.codecs import CodecState
    from fedsqueeze.codecs.autoencoder import find_stage
    from fedsqueeze.collaborator.prepass import record_snapshots, train_autoencoder, training_set
    from fedsqueeze.models import build_model, model_layout, set_flat
    from fedsqueeze.plan import Plan
    from fedsqueeze.tasks import load_plan_dataset, partition
    from fedsqueeze.training import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--plan", default=str(Path(__file__).resolve().parents[1] / "fedsqueeze" / "plans" / "ae-paper.json")
    )
    ap.add_argument("--out", default="runs/ae-validation.png")
    ap.add_argument("--every", type=int, default=6, help="evaluate every k-th snapshot")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    plan = Plan.load(args.plan)
    plan.prepass.what, plan.uplink.target = "weights", "weights"  # section 5.1 reconstructs weights
    plan.prepass.correction = 0.0
    data = load_plan_dataset(plan)
    idx = partition(data.partition_labels, plan.num_shards, plan.task.partition, plan.task.alpha, plan.seed)[
        0
    ]
    model = build_model(plan.model.name, data.input_shape, data.num_classes, plan.model.args, plan.seed)
    layout = model_layout(model)
    snaps = record_snapshots(model, data.x_train[idx], data.y_train[idx], plan, seed=plan.seed)
    chain = LinkChains.from_plan(plan).uplink
    index, stage = find_stage(chain)
    enc, dec, losses = train_autoencoder(stage, training_set(snaps, plan, len(idx)), epochs=plan.prepass.ae_epochs,
                                         lr=plan.prepass.ae_lr, seed=plan.seed)  # fmt: skip
    tx, rx = CodecState(), CodecState()
    tx.stage(index).update({**enc, **dec})
    rx.stage(index).update(dec)
    rows = []
    for i in range(0, len(snaps), args.every):
        data_i = chain.encode(snaps[i], layout, tx).data
        recon = chain.decode(data_i, layout, rx)
        set_flat(model, snaps[i])
        acc_o = evaluate(model, data.x_test, data.y_test)[1]
        set_flat(model, recon)
        acc_r = evaluate(model, data.x_test, data.y_test)[1]
        rows.append((i, acc_o, acc_r, len(data_i)))
    print(f"AE {stage.architecture(layout.numel)}; final AE loss {losses[-1]:.3g}; {len(snaps)} snapshots")
    print(f"{'snapshot':>8}  {'original':>8}  {'AE recon':>8}  {'bytes':>5}")
    for i, a, r, b in rows:
        print(f"{i:>8}  {a:>8.2%}  {r:>8.2%}  {b:>5}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="original weights")
    ax.plot([r[0] for r in rows], [r[2] for r in rows], "s--", label="AE-reconstructed weights")
    ax.set_xlabel(f"prepass snapshot (every {plan.prepass.snapshot_every})")
    ax.set_ylabel("test accuracy")
    ax.set_title("seed 001 Fig. 5: original vs AE-predicted weights")
    ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")
    return 0 if np.isfinite([r[2] for r in rows]).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
