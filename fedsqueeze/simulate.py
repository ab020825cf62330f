"""An in-process federation with the same data shards, seeds, training and codecs as a real one.

Used for the uncompressed baseline of `fedsqueeze demo --ae` (`baseline_accuracy`: the identity
chain with the same plan and seed) and for quick experiments. Collaborator i trains shard i with
the seed the real collaborator of shard i uses, sender and receiver keep separate CodecStates,
and wire bytes are the serialized Payload's size, exactly as over gRPC.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from fedsqueeze.codecs import CodecState
from fedsqueeze.models import build_model, get_flat, model_layout, set_flat
from fedsqueeze.plan import Plan
from fedsqueeze.tasks import partition
from fedsqueeze.training import evaluate, train_local
from fedsqueeze.wire import WirePayload, payload_wire_size


def uncompressed(plan: Plan) -> Plan:
    """The same plan with identity chains and no prepass (the server optimizer stays: it is not compression)."""
    base = copy.deepcopy(plan)
    base.uplink.chain, base.uplink.target, base.downlink.chain = "identity", "delta", "identity"
    base.downlink.update_chain, base.downlink.prior = None, "none"
    base.prepass.enabled = False
    return base


def simulate(plan: Plan, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    import torch

    from fedsqueeze.aggregator.global_update import GlobalUpdate
    from fedsqueeze.aggregator.server_optimizer import ServerOptimizer
    from fedsqueeze.aggregator.strategy import FedAvg
    from fedsqueeze.codecs.autoencoder import find_stage

    torch.set_num_threads(1)
    data = plan.load_data()
    k = plan.collaborators.min
    shards = partition(data.y_train, plan.num_shards, plan.task.partition, plan.task.alpha, plan.seed)[:k]
    model = build_model(plan.model.name, data.input_shape, data.num_classes, plan.model.args, plan.seed)
    layout = model_layout(model)
    global_model = get_flat(model)
    up = plan.uplink_chain()
    fp = up.fingerprint(layout)
    down = plan.downlink_chain()
    global_update = GlobalUpdate(plan.downlink_update_chain())
    server_optimizer = ServerOptimizer(plan.aggregation.server_optimizer)
    tx = [CodecState() for _ in shards]
    rx = [CodecState() for _ in shards]
    # Both states are built here, before any round, so the current model is the initial one (priming copies it).
    down_tx = [plan.downlink_state(down, global_model) for _ in shards]  # the aggregator's sender state, per collaborator
    down_rx = [plan.downlink_state(down, global_model) for _ in shards]
    out: dict[str, Any] = {"rounds": [], "prepass": []}
    found = find_stage(up)
    if plan.prepass.enabled and found is not None:
        from fedsqueeze.collaborator.prepass import record_snapshots, train_autoencoder, training_set

        index, stage = found
        shared: dict[str, np.ndarray] | None = None
        for i, idx in enumerate(shards):
            set_flat(model, global_model)
            snaps = record_snapshots(model, data.x_train[idx], data.y_train[idx], plan, seed=plan.seed * 100_003 + 7919 + i)
            samples = training_set(snaps, plan, len(idx))
            decoder = shared if plan.prepass.decoder == "shared" else None
            enc, dec, losses = train_autoencoder(stage, samples, epochs=plan.prepass.ae_epochs, lr=plan.prepass.ae_lr,
                                                 seed=plan.seed, decoder=decoder)  # fmt: skip
            if plan.prepass.decoder == "shared" and shared is None:
                shared = dec
            tx[i].stage(index).update({**enc, **dec})
            rx[i].stage(index).update(dec)
            out["prepass"].append({"snapshots": len(snaps), "samples": len(samples), "loss": losses[-1]})
    set_flat(model, global_model)
    out["initial_accuracy"] = evaluate(model, data.x_test, data.y_test)[1]
    t = plan.training
    for rnd in range(1, plan.rounds + 1):
        strategy = FedAvg(target=plan.uplink.target)
        strategy.begin(global_model)
        wires, nmses = [], []
        for i, idx in enumerate(shards):
            # What collaborator i receives: the global model through the downlink chain.
            global_hat = down.decode(down.encode(global_model, layout, down_tx[i]).data, layout, down_rx[i])
            set_flat(model, global_hat)
            train_local(model, data.x_train[idx], data.y_train[idx], epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
                        momentum=t.momentum, weight_decay=t.weight_decay, seed=plan.seed * 100_003 + rnd * 1009 + i)  # fmt: skip
            local = get_flat(model)
            x = local - global_hat if plan.uplink.target == "delta" else local
            enc = up.encode(x, layout, tx[i])
            wires.append(payload_wire_size(WirePayload(data=enc.data, fingerprint=fp)))
            nmses.append(enc.stats.nmse)
            strategy.accumulate(up.decode(enc.data, layout, rx[i]), float(len(idx)))
        global_model = global_update.apply(global_model, server_optimizer.apply(global_model, strategy.finish()), layout)
        set_flat(model, global_model)
        loss, acc = evaluate(model, data.x_test, data.y_test)
        rec = {"round": rnd, "accuracy": acc, "loss": loss, "up_wire": wires, "nmse": float(np.mean(nmses))}
        out["rounds"].append(rec)
        if on_round is not None:
            on_round(rec)
    out["final_accuracy"] = out["rounds"][-1]["accuracy"]
    out["raw_bytes"] = layout.raw_bytes
    return out
