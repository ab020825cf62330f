"""The `collaborator join` loop: join, load the local shard, then run each task until DONE.

The work of a round is `round_step.RoundStep` (also what the in-process simulation runs); this
module adds the gRPC client, the local data, the prepass, the report and the progress bar.
UNAUTHENTICATED (an aggregator that no longer knows this collaborator) joins again, provided the
plan is the same, with fresh codec states.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import CodecState
from fedsqueeze.errors import Unauthenticated
from fedsqueeze.messages import Task
from fedsqueeze.metrics import Metrics
from fedsqueeze.report import write_json_atomic
from fedsqueeze.tasks import GENERATED, Dataset, load_dataset, parse_data_arg, partition
from fedsqueeze.tls import ClientTLS

from .round_step import BuiltinTrainer, LinkStates, RoundStep
from .transport import FederationClient, Session

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
    ds: Dataset = load_dataset(
        name, path, plan.seed, plan.task.num_samples if name == plan.task.dataset else 0
    )
    if data_arg is None or name in GENERATED:
        shards = partition(ds.y_train, session.num_shards, plan.task.partition, plan.task.alpha, plan.seed)
        idx = shards[session.shard_index % len(shards)]
        desc = f"{name} shard {session.shard_index + 1}/{session.num_shards} ({len(idx)} samples)"
        return LocalData(ds.x_train[idx], ds.y_train[idx], ds.input_shape, ds.num_classes, desc)
    return LocalData(
        ds.x_train, ds.y_train, ds.input_shape, ds.num_classes, f"{name} {path} ({len(ds.y_train)} samples)"
    )


@dataclass
class CollaboratorReport:
    """What this collaborator sent and received, for checking the aggregator's byte counts."""

    path: Path | None
    collaborator_id: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    prepass: dict[str, Any] = field(default_factory=dict)

    def add_round(self, record: dict[str, Any]) -> None:
        # a round trained again replaces its record
        self.rounds = [r for r in self.rounds if r["round"] != record["round"]] + [record]
        self.write()

    def write(self) -> None:
        if self.path is not None:
            data: dict[str, Any] = {"collaborator_id": self.collaborator_id, "rounds": self.rounds}
            if self.prepass:
                data["prepass"] = self.prepass
            write_json_atomic(self.path, data)


class CollaboratorRun:
    """One collaborator process's membership: its session, data, model, round step and report."""

    def __init__(
        self,
        client: FederationClient,
        session: Session,
        data_arg: str | None,
        metrics: Metrics,
        report: CollaboratorReport,
    ) -> None:
        from fedsqueeze.models import build_model, get_flat, model_layout

        self.client, self.data_arg, self.metrics, self.report = client, data_arg, metrics, report
        self.plan = session.plan
        self.chains = LinkChains.from_plan(self.plan)
        self.local = load_local_data(session, data_arg)
        self.model = build_model(
            self.plan.model.name,
            self.local.input_shape,
            self.local.num_classes,
            self.plan.model.args,
            self.plan.seed,
        )
        self.layout = model_layout(self.model)
        # downlink.prior "initial": the aggregator builds the same one
        self.initial_model = get_flat(self.model)
        self.prepass: Any = None
        self._start(session)

    def _start(self, session: Session) -> None:
        """Fresh codec states and round step for a (new) membership."""
        self.session = session
        self.report.collaborator_id = session.collaborator_id
        states = LinkStates(up=CodecState(), down=self.chains.downlink_state(self.initial_model))
        trainer = BuiltinTrainer(self.plan, self.model, self.local.x, self.local.y, session.shard_index)
        self.step = RoundStep(self.plan, self.chains, self.layout, trainer, states, self.client.submit_update,
                              member_id=session.collaborator_id, metrics=self.metrics)  # fmt: skip
        self.prepass = None

    def rejoin(self) -> None:
        old_shard = self.session.shard_index
        session = self.client.rejoin()
        if session.shard_index != old_shard:
            self.local = load_local_data(session, self.data_arg)
        self._start(session)

    def handle(self, task: Task) -> dict[str, Any] | None:
        """Run one task; the round's record for a TRAIN task that was accepted."""
        if task.kind == "PREPASS":
            from .prepass import PrepassContext, handle_task

            if self.prepass is None:
                self.prepass = PrepassContext(self.client.upload_decoder, self.session.collaborator_id, self.session.shard_index,
                                              self.plan, self.step, self.model, self.local.x, self.local.y)  # fmt: skip
            self.report.prepass = handle_task(self.prepass, task)
            self.report.write()
            return None
        if task.kind != "TRAIN" or task.model is None:
            return None
        record = self.step.run(task)
        if record is None:
            return None
        self.report.add_round(record.to_json())
        return record.to_json() | {"ratio": record.encode_stats.ratio if record.encode_stats else 0.0}


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
    join_token: str = "",
) -> dict[str, Any]:
    """Join the federation at `server` and train until it is done. The result says whether it
    `completed` (ran all its rounds) or ended early (`outcome` says why)."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)  # several collaborators share a machine in the demo and tests
    # torch's first optimizer imports torch._dynamo (seconds): pay for it before joining, not in round 1.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    client = FederationClient(
        server,
        connect_timeout=connect_timeout,
        reconnect_timeout=reconnect_timeout,
        tls=tls,
        join_token=join_token,
    )
    try:
        run = CollaboratorRun(client, client.join(name or socket.gethostname()), data, prom or Metrics("collaborator"),
                              CollaboratorReport(report_path))  # fmt: skip
        log.info("joined as %s: %s", run.session.collaborator_id, run.local.description)
        bar = tqdm(
            total=run.plan.rounds,
            desc=run.session.collaborator_id,
            unit="round",
            disable=not progress,
            leave=False,
        )
        trained = 0
        while True:
            try:
                task = client.get_task(wait_s=10.0)
            except Unauthenticated as exc:
                log.warning(
                    "the aggregator does not know %s any more (%s): joining again",
                    run.session.collaborator_id,
                    exc,
                )
                run.rejoin()
                continue
            if task.kind == "DONE":
                done = task
                break
            record = run.handle(task)
            if record is not None:
                trained += 1
                bar.update(task.round - bar.n)
                bar.set_postfix(
                    loss=f"{record.get('train_loss', float('nan')):.3f}", up=f"{record['ratio']:.0f}x"
                )
        bar.close()
        client.leave("done")
        run.report.write()
        return {"collaborator_id": run.session.collaborator_id, "rounds_trained": trained, "completed": done.completed,
                "outcome": done.message}  # fmt: skip
    finally:
        client.close()
