"""Drive a real `aggregator.federation.Federation` in-process, with collaborators as objects.

The aggregator side is the production code: `Federation.run` runs its round loop in a thread
(selection, downlink encoding with each collaborator's CodecState, decoding, streaming FedAvg,
evaluation, the run report). Each collaborator is a `collaborator.round_step.RoundStep` (the one
a `collaborator join` process runs) whose submissions go straight to `Federation.submit_update`,
with the payload's wire size (`Payload.wire_size`, the serialized message's length), so the byte
counts are what gRPC carries. PREPASS tasks go through `collaborator/prepass.py`, whose decoder
upload lands in `Federation.upload_decoder`.

The only thing not exercised is the transport (protobuf envelopes, HTTP/2); `bench.grpc_check`
runs the same plan over real gRPC processes and compares the byte counts round by round.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedsqueeze.aggregator.federation import Federation
from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import CodecState
from fedsqueeze.collaborator.prepass import PrepassContext, handle_task
from fedsqueeze.collaborator.round_step import BuiltinTrainer, LinkStates, RoundStep, Submit
from fedsqueeze.messages import Admission, Evaluation
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan
from fedsqueeze.report import RoundRecord
from fedsqueeze.tasks import Dataset, load_plan_dataset, partition


def uncompressed(plan: Plan) -> Plan:
    """The same plan with identity chains and no prepass (the server optimizer stays: it is not compression)."""
    base = copy.deepcopy(plan)
    base.uplink.chain, base.uplink.target, base.downlink.chain = "identity", "delta", "identity"
    base.downlink.update_chain, base.downlink.prior = None, "none"
    base.prepass.enabled = False
    return base


@dataclass
class SimCollaborator:
    admission: Admission
    step: RoundStep
    prepass: PrepassContext | None = None
    # per round: up_wire, down_wire, the uplink's nmse
    sent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.admission.collaborator_id

    @property
    def states(self) -> LinkStates:
        return self.step.states


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

    @property
    def final_accuracy(self) -> float | None:
        value = self.report["summary"]["final_accuracy"]
        return None if value is None else float(value)


class InProcessFederation:
    """One Federation plus `plan.collaborators.min` simulated collaborators, all in this process."""

    def __init__(self, plan: Plan, data: Dataset | None = None) -> None:
        import torch

        from fedsqueeze.models import build_model, get_flat, model_layout

        torch.set_num_threads(1)
        logging.getLogger("fedsqueeze").setLevel(logging.WARNING)
        self.plan = plan
        self.fed = Federation(plan)
        self.data = data if data is not None else load_plan_dataset(plan)
        self.chains = LinkChains.from_plan(plan)
        self.model = build_model(
            plan.model.name, self.data.input_shape, self.data.num_classes, plan.model.args, plan.seed
        )
        self.layout = model_layout(self.model)
        initial_model = get_flat(self.model)
        shards = partition(
            self.data.partition_labels, plan.num_shards, plan.task.partition, plan.task.alpha, plan.seed
        )
        self.collaborators: list[SimCollaborator] = []
        self.encode_seconds = 0.0
        self.train_seconds = 0.0
        for i in range(plan.collaborators.min):
            # Join order = shard index, as for real collaborators (Federation assigns shards by join order).
            admission = self.fed.join(f"sim-{i}", 0)
            idx = shards[admission.shard_index % len(shards)]
            trainer = _TimedTrainer(
                BuiltinTrainer(
                    plan, self.model, self.data.x_train[idx], self.data.y_train[idx], admission.shard_index
                ),
                self,
            )
            states = LinkStates(up=CodecState(), down=self.chains.downlink_state(initial_model))
            step = RoundStep(
                plan,
                self.chains,
                self.layout,
                trainer,
                states,
                self._submitter(admission),
                member_id=admission.collaborator_id,
            )
            self.collaborators.append(SimCollaborator(admission, step))

    def _submitter(self, a: Admission) -> Submit:
        def submit(
            round_number: int,
            num_samples: int,
            payload: Payload,
            metrics: dict[str, float],
            evaluation: Evaluation | None,
        ) -> int:
            return self.fed.submit_update(
                a.collaborator_id,
                a.token,
                round_number,
                num_samples,
                payload,
                payload.wire_size,
                metrics,
                evaluation,
            )

        return submit

    def _handle(self, c: SimCollaborator, task: Any) -> None:
        if task.kind == "PREPASS":
            if c.prepass is None:
                data = c.step.trainer
                assert isinstance(data, _TimedTrainer)
                c.prepass = PrepassContext(self._decoder_uploader(c.admission), c.id, c.admission.shard_index, self.plan, c.step,
                                           self.model, data.inner.x, data.inner.y)  # fmt: skip
            handle_task(c.prepass, task)
            return
        record = c.step.run(task)
        if record is not None:
            self.encode_seconds += record.encode_seconds
            c.sent.append(
                {
                    "round": task.round,
                    "up_wire": record.up_wire,
                    "down_wire": record.down_wire,
                    "nmse": record.nmse,
                }
            )

    def _decoder_uploader(self, a: Admission) -> Callable[[dict[str, Any], bytes], int]:
        def upload(architecture: dict[str, Any], blob: bytes) -> int:
            return self.fed.upload_decoder(a.collaborator_id, a.token, architecture, blob)

        return upload

    def run(self, on_round: Callable[[RoundRecord], Any] | None = None) -> SimResult:
        """Run every round (or until `on_round(record)` returns True)."""
        fed = self.fed
        stop = threading.Event()
        error: list[BaseException] = []

        def rounds() -> None:
            try:
                fed.run(stop)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                error.append(exc)
                fed.shutdown(f"ended early: {exc}")

        seen = 0
        t0 = time.perf_counter()
        thread = threading.Thread(target=rounds, name="rounds", daemon=True)
        thread.start()
        try:
            done = False
            while not done:
                progressed = False
                for c in self.collaborators:
                    task = fed.get_task(c.id, c.admission.token, 0.0)
                    if task.kind == "DONE":
                        done = True
                        break
                    if task.kind in ("PREPASS", "TRAIN"):
                        self._handle(c, task)
                        progressed = True
                if on_round is not None:
                    while seen < len(fed.report.rounds) and not done:
                        # on_round may end the run early by returning True (the open round is discarded).
                        done = on_round(fed.report.rounds[seen]) is True
                        seen += 1
                if error:
                    raise error[0]
                if not progressed and not done:
                    fed.wait_for_change(0.01)  # until the round thread opens the next round
        finally:
            stop.set()
            thread.join(30)
        if error:
            raise error[0]
        return SimResult(
            fed.report.to_json(),
            time.perf_counter() - t0,
            self.collaborators,
            self.encode_seconds,
            self.train_seconds,
        )


class _TimedTrainer:
    """A trainer that adds its time to the simulation's total."""

    def __init__(self, inner: BuiltinTrainer, sim: InProcessFederation) -> None:
        self.inner, self.sim = inner, sim

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def train(self, weights: Any, round_number: int) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner.train(weights, round_number)
        finally:
            self.sim.train_seconds += time.perf_counter() - t0


def run_plan(
    plan: Plan, data: Dataset | None = None, on_round: Callable[[RoundRecord], Any] | None = None
) -> SimResult:
    return InProcessFederation(plan, data).run(on_round)
