"""The collaborator loop: join, load the local shard, then train and submit until DONE.

Resuming: the codec states are snapshotted before each round's model is decoded. A TRAIN task for
a round already handled (the aggregator restarted from the checkpoint before it) restores that
snapshot, so both sides' states match again, and the round is trained again (deterministically:
same seed). An update refused because its round closed (FAILED_PRECONDITION) rolls the uplink state
back. UNAUTHENTICATED (an aggregator that no longer knows this collaborator) re-joins, provided
the plan is the same, with fresh codec states.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedsqueeze.codecs import CodecState
from fedsqueeze.metrics import Metrics
from fedsqueeze.models import build_model, get_flat, model_layout, set_flat
from fedsqueeze.report import write_json_atomic
from fedsqueeze.tasks import Dataset, load_dataset, parse_data_arg, partition
from fedsqueeze.tls import ClientTLS
from fedsqueeze.training import train_local
from fedsqueeze.wire import WirePayload

from .transport import FederationClient, RemoteError, Session

log = logging.getLogger("fedsqueeze.collaborator")


@dataclass
class LocalData:
    x: np.ndarray
    y: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    description: str


def load_local_data(session: Session, data_arg: str | None) -> LocalData:
    """The plan's built-in data set, cut to this collaborator's shard, or the user's own data."""
    plan = session.plan
    if data_arg is None:
        name, path = plan.task.dataset, plan.task.data_path
    else:
        name, path = parse_data_arg(data_arg)
    ds: Dataset = load_dataset(name, path, plan.seed, plan.task.num_samples if name == plan.task.dataset else 0)
    if data_arg is None or name in ("digits", "mnist1d"):
        shards = partition(ds.y_train, session.num_shards, plan.task.partition, plan.task.alpha, plan.seed)
        idx = shards[session.shard_index % len(shards)]
        desc = f"{name} shard {session.shard_index + 1}/{session.num_shards} ({len(idx)} samples)"
        return LocalData(ds.x_train[idx], ds.y_train[idx], ds.input_shape, ds.num_classes, desc)
    return LocalData(ds.x_train, ds.y_train, ds.input_shape, ds.num_classes, f"{name} {path} ({len(ds.y_train)} samples)")


@dataclass
class CollaboratorReport:
    """What this collaborator sent and received, for checking the aggregator's byte counts."""

    path: Path | None
    collaborator_id: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    prepass: dict[str, Any] = field(default_factory=dict)

    def write(self) -> None:
        if self.path is not None:
            data: dict[str, Any] = {"collaborator_id": self.collaborator_id, "rounds": self.rounds}
            if self.prepass:
                data["prepass"] = self.prepass
            write_json_atomic(self.path, data)


def run_collaborator(
    server: str,
    *,
    data: str | None = None,
    name: str | None = None,
    connect_timeout: float = 60.0,
    report_path: Path | None = None,
    progress: bool = True,
    prom: Metrics | None = None,
    tls: ClientTLS | None = None,
    reconnect_timeout: float = 300.0,
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # several collaborators share a machine in the demo and tests
    client = FederationClient(server, connect_timeout=connect_timeout, reconnect_timeout=reconnect_timeout, tls=tls)
    try:
        session = client.join(name or socket.gethostname())
        plan = session.plan
        local = load_local_data(session, data)
        model = build_model(plan.model.name, local.input_shape, local.num_classes, plan.model.args, plan.seed)
        layout = model_layout(model)
        up_chain, down_chain = plan.uplink_chain(), plan.downlink_chain()
        up_fp = up_chain.fingerprint(layout)
        initial_model = get_flat(model)  # downlink.prior "initial": the aggregator builds the same one
        up_state, down_state = CodecState(), plan.downlink_state(down_chain, initial_model)
        prom = prom if prom is not None else Metrics("collaborator")
        me, up_codec, down_codec = session.collaborator_id, str(up_chain), str(down_chain)
        report = CollaboratorReport(report_path, session.collaborator_id)
        log.info("joined as %s: %s", session.collaborator_id, local.description)

        from tqdm import tqdm

        bar = tqdm(total=plan.rounds, desc=session.collaborator_id, unit="round", disable=not progress, leave=False)
        trained = 0
        prepass_ctx = None
        snapshot: tuple[int, bytes, bytes] | None = None  # (round, up state, down state) before that round
        while True:
            try:
                task = client.get_task(wait_s=10.0)
            except RemoteError as exc:
                if exc.code != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                log.warning("the aggregator does not know %s any more (%s): joining again", me, exc.details)
                old_shard = session.shard_index
                session = client.rejoin()
                me = report.collaborator_id = session.collaborator_id
                if session.shard_index != old_shard:
                    local = load_local_data(session, data)
                up_state, down_state = CodecState(), plan.downlink_state(down_chain, initial_model)
                snapshot, prepass_ctx = None, None
                continue
            if task.kind == "DONE":
                break
            if task.kind == "PREPASS":
                from .prepass import PrepassContext, handle_task

                if prepass_ctx is None:
                    prepass_ctx = PrepassContext(client, session, model, local.x, local.y, layout, up_chain, up_state, down_chain, down_state)
                report.prepass = handle_task(prepass_ctx, task)
                report.write()
                continue
            if task.kind != "TRAIN" or task.model is None:
                continue
            if snapshot is not None and snapshot[0] == task.round:
                # This round again: the aggregator restarted from an earlier checkpoint.
                log.warning("round %d again (the aggregator resumed from its checkpoint): restoring the codec states", task.round)
                up_state, down_state = CodecState.from_bytes(snapshot[1]), CodecState.from_bytes(snapshot[2])
                report.rounds = [r for r in report.rounds if r["round"] != task.round]
            else:
                snapshot = (task.round, up_state.to_bytes(), down_state.to_bytes())
            t0 = time.perf_counter()
            chain, _ = task.model.resolve(down_chain, layout)
            global_hat = chain.decode(task.model.data, layout, down_state)
            prom.record_decode("down", down_codec, time.perf_counter() - t0)
            prom.record_transfer("down", down_codec, me, raw=layout.raw_bytes, wire=task.wire_bytes)
            t_train = time.perf_counter()
            set_flat(model, global_hat)
            metrics = train_local(
                model,
                local.x,
                local.y,
                epochs=plan.training.local_epochs,
                batch_size=plan.training.batch_size,
                lr=plan.training.lr,
                momentum=plan.training.momentum,
                weight_decay=plan.training.weight_decay,
                seed=plan.seed * 100_003 + task.round * 1009 + session.shard_index,
            )
            prom.record_training(task.round, time.perf_counter() - t_train, metrics.get("loss"))
            local_vec = get_flat(model)
            x = local_vec - global_hat if plan.uplink.target == "delta" else local_vec
            encoded = up_chain.encode(x, layout, up_state)
            prom.record_encode("up", up_codec, encoded.stats)
            payload = WirePayload(data=encoded.data, fingerprint=up_fp)
            try:
                wire = client.submit_update(task.round, len(local.y), payload, metrics)
            except RemoteError as exc:
                prom.record_message("up", "update", exc.code.name)
                if exc.code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    raise
                # Too late (the round closed) or no longer ours: drop it, undo its uplink state.
                log.warning("round %d: update not accepted (%s); going on", task.round, exc)
                assert snapshot is not None
                up_state = CodecState.from_bytes(snapshot[1])
                continue
            prom.record_transfer("up", up_codec, me, raw=layout.raw_bytes, wire=wire)
            trained += 1
            record = {
                "round": task.round,
                "up_raw": layout.raw_bytes,
                "up_wire": wire,
                "down_raw": layout.raw_bytes,
                "down_wire": task.wire_bytes,
                "nmse": encoded.stats.nmse,
                "encode_seconds": encoded.stats.seconds,
                "seconds": time.perf_counter() - t0,
                **{f"train_{k}": v for k, v in metrics.items()},
            }
            report.rounds.append(record)
            report.write()
            bar.update(task.round - bar.n)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", up=f"{encoded.stats.ratio:.0f}x")
        bar.close()
        client.leave("done")
        report.write()
        return {"collaborator_id": session.collaborator_id, "rounds_trained": trained}
    finally:
        client.close()
