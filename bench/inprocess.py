"""Drive a real `aggregator.federation.Federation` in-process, with collaborators as objects.

The aggregator side is the production code: `Federation.run` runs its round loop in a thread
(selection, downlink encoding with each collaborator's CodecState, decoding, streaming FedAvg,
evaluation, the run report). Each collaborator here is an object with its own uplink and downlink
CodecStates that does what `collaborator/runner.py` does with a task (decode the model, train with
`fedsqueeze.training.train_local` and the same seed formula, encode the update with the plan's
chain) and hands the serialized `Payload` bytes to `Federation.submit_update`, so the byte counts
are the payload sizes that gRPC would carry. PREPASS tasks go through `collaborator/prepass.py`'s
`handle_task`, whose decoder upload lands in `Federation.upload_decoder`.

The only thing not exercised is the transport (protobuf envelopes, HTTP/2); `bench.grpc_check`
runs the same plan over real gRPC processes and compares the byte counts round by round.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsqueeze.codecs import CodecState
from fedsqueeze.models import build_model, get_flat, model_layout, set_flat
from fedsqueeze.plan import Plan
from fedsqueeze.tasks import Dataset, partition
from fedsqueeze.training import train_local
from fedsqueeze.wire import WirePayload, payload_to_proto, payload_wire_size


@dataclass
class _Session:
    collaborator_id: str
    token: str
    plan: Plan
    shard_index: int
    num_shards: int


class _LocalClient:
    """What `collaborator/prepass.py` calls on its client, wired straight into the Federation."""

    def __init__(self, fed: Any, session: _Session) -> None:
        self.fed, self.session = fed, session

    def upload_decoder(self, architecture: dict[str, Any], blob: bytes) -> int:
        return int(self.fed.upload_decoder(self.session.collaborator_id, self.session.token, architecture, blob))


@dataclass
class SimCollaborator:
    session: _Session
    x: np.ndarray
    y: np.ndarray
    up_state: CodecState = field(default_factory=CodecState)
    down_state: CodecState = field(default_factory=CodecState)
    prepass_ctx: Any = None
    sent: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SimResult:
    report: dict[str, Any]  # the Federation's run report (to_json)
    seconds: float
    collaborators: list[SimCollaborator]
    encode_seconds: float = 0.0
    train_seconds: float = 0.0

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list(self.report["rounds"])

    @property
    def prepass_bytes(self) -> dict[str, int]:
        return dict(self.report["prepass_bytes"])


class InProcessFederation:
    """One Federation plus `plan.collaborators.min` simulated collaborators, all in this process."""

    def __init__(self, plan: Plan, data: Dataset | None = None) -> None:
        import torch

        from fedsqueeze.aggregator.federation import Federation

        torch.set_num_threads(1)
        logging.getLogger("fedsqueeze").setLevel(logging.WARNING)
        self.plan = plan
        self.fed = Federation(plan)
        self.data = data if data is not None else plan.load_data()
        self.model = build_model(plan.model.name, self.data.input_shape, self.data.num_classes, plan.model.args, plan.seed)
        self.layout = model_layout(self.model)
        self.up_chain, self.down_chain = plan.uplink_chain(), plan.downlink_chain()
        self.up_fp = self.up_chain.fingerprint(self.layout)
        initial_model = get_flat(self.model)
        shards = partition(self.data.y_train, plan.num_shards, plan.task.partition, plan.task.alpha, plan.seed)
        self.collaborators: list[SimCollaborator] = []
        for i in range(plan.collaborators.min):
            # Join order = shard index, as for real collaborators (Federation assigns shards by join order).
            r = self.fed.join(f"sim-{i}", 0)
            idx = shards[r.shard_index % len(shards)]
            s = _Session(r.collaborator_id, r.token, plan, r.shard_index, r.num_shards)
            down_state = plan.downlink_state(self.down_chain, initial_model)
            self.collaborators.append(SimCollaborator(s, self.data.x_train[idx], self.data.y_train[idx], down_state=down_state))
        self.encode_seconds = 0.0
        self.train_seconds = 0.0

    # -- one task, as collaborator/runner.py handles it --------------------------------------------------
    def _train(self, c: SimCollaborator, task: Any) -> None:
        plan, layout = self.plan, self.layout
        chain, _ = task.model.resolve(self.down_chain, layout)
        global_hat = chain.decode(task.model.data, layout, c.down_state)
        set_flat(self.model, global_hat)
        t0 = time.perf_counter()
        t = plan.training
        train_local(self.model, c.x, c.y, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                    weight_decay=t.weight_decay, seed=plan.seed * 100_003 + task.round * 1009 + c.session.shard_index)  # fmt: skip
        t1 = time.perf_counter()
        local = get_flat(self.model)
        x = local - global_hat if plan.uplink.target == "delta" else local
        encoded = self.up_chain.encode(x, layout, c.up_state)
        self.train_seconds += t1 - t0
        self.encode_seconds += time.perf_counter() - t1
        blob = payload_to_proto(WirePayload(data=encoded.data, fingerprint=self.up_fp)).SerializeToString()
        wire = self.fed.submit_update(c.session.collaborator_id, c.session.token, task.round, len(c.y), blob, {})
        c.sent.append({"round": task.round, "up_wire": wire, "down_wire": payload_wire_size(task.model)})

    def _prepass(self, c: SimCollaborator, task: Any) -> None:
        from fedsqueeze.collaborator.prepass import PrepassContext, handle_task

        if c.prepass_ctx is None:
            client = _LocalClient(self.fed, c.session)
            c.prepass_ctx = PrepassContext(client, c.session, self.model, c.x, c.y, self.layout, self.up_chain, c.up_state,
                                           self.down_chain, c.down_state)  # fmt: skip
        # The collaborator's TaskMessage carries the wire size of the model; handle_task reads it.
        msg = _TaskView(task.kind, task.round, task.model, payload_wire_size(task.model) if task.model else 0, task.message)
        handle_task(c.prepass_ctx, msg)

    def run(self, on_round: Any = None) -> SimResult:
        """Run every round (or until `on_round(record)` returns True)."""
        fed = self.fed
        stop = threading.Event()
        error: list[BaseException] = []

        def rounds() -> None:
            try:
                fed.run(stop)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                error.append(exc)
                fed.shutdown()

        seen = 0
        t0 = time.perf_counter()
        thread = threading.Thread(target=rounds, name="rounds", daemon=True)
        thread.start()
        try:
            done = False
            while not done:
                progressed = False
                for c in self.collaborators:
                    task = fed.get_task(c.session.collaborator_id, c.session.token, 0.0)
                    if task.kind == "DONE":
                        done = True
                        break
                    if task.kind == "PREPASS":
                        self._prepass(c, task)
                        progressed = True
                    elif task.kind == "TRAIN" and task.model is not None:
                        self._train(c, task)
                        progressed = True
                if on_round is not None:
                    while seen < len(fed.report.rounds) and not done:
                        # on_round may end the run early by returning True (the open round is discarded).
                        done = on_round(fed.report.rounds[seen]) is True
                        seen += 1
                if error:
                    raise error[0]
                if not progressed and not done:
                    with fed._cond:  # wait for the round thread to open the next round
                        fed._cond.wait(0.01)
        finally:
            stop.set()
            thread.join(30)
        if error:
            raise error[0]
        return SimResult(fed.report.to_json(), time.perf_counter() - t0, self.collaborators, self.encode_seconds, self.train_seconds)


@dataclass
class _TaskView:
    kind: str
    round: int
    model: Any
    wire_bytes: int
    message: str


def run_plan(plan: Plan, data: Dataset | None = None, on_round: Any = None) -> SimResult:
    return InProcessFederation(plan, data).run(on_round)
