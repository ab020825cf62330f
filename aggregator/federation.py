"""The aggregator's domain logic: membership, rounds, decoding and aggregation. No protobuf here.

Threads: gRPC handler threads call `join`, `get_task`, `submit_update`, `upload_decoder` and
`leave`; one round thread runs `run`. Shared state is guarded by one condition variable;
decoding, the expensive part, runs outside it, serialised per collaborator because each
collaborator's uplink CodecState must see its messages in order.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsqueeze.codecs import CodecError, CodecState, Layout, Pipeline
from fedsqueeze.errors import (
    AlreadyExists,
    FailedPrecondition,
    FederationError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from fedsqueeze.metrics import Metrics
from fedsqueeze.models import build_model, get_flat, model_layout, set_flat
from fedsqueeze.plan import Plan
from fedsqueeze.report import RoundRecord, RunReport
from fedsqueeze.tasks import load_dataset
from fedsqueeze.training import evaluate
from fedsqueeze.wire import WirePayload, payload_from_bytes, payload_wire_size

from .decoders import Prepass
from .strategy import FedAvg, Strategy

log = logging.getLogger("fedsqueeze.aggregator")

MAX_NAME_LEN = 128


@dataclass
class Collaborator:
    id: str
    token: str
    name: str
    shard_index: int
    num_samples: int = 0
    active: bool = True
    up_state: CodecState = field(default_factory=CodecState)  # receiver side of the uplink
    down_state: CodecState = field(default_factory=CodecState)  # sender side of the downlink
    lock: threading.Lock = field(default_factory=threading.Lock)
    decoder_bytes: int = 0


@dataclass
class RoundState:
    number: int
    participants: set[str]
    deadline: float
    strategy: Strategy
    started: float = field(default_factory=time.monotonic)
    submitted: set[str] = field(default_factory=set)
    receiving: set[str] = field(default_factory=set)
    sent: dict[str, WirePayload] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("up_raw", "up_wire", "down_raw", "down_wire", "decoder"), 0))

    def complete(self, active: set[str]) -> bool:
        return all(c in self.submitted or c not in active for c in self.participants)


@dataclass
class JoinResult:
    collaborator_id: str
    token: str
    plan_json: str
    plan_sha256: str
    shard_index: int
    num_shards: int


@dataclass
class Task:
    kind: str  # WAIT | TRAIN | PREPASS | DONE
    round: int = 0
    model: WirePayload | None = None
    message: str = ""


class Federation:
    def __init__(
        self,
        plan: Plan,
        *,
        report_path: Any = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.plan = plan
        self.data = load_dataset(plan.task.dataset, plan.task.data_path, plan.seed)
        self.model = build_model(plan.model.name, self.data.input_shape, self.data.num_classes, plan.model.args, plan.seed)
        self.layout: Layout = model_layout(self.model)
        self.global_model = get_flat(self.model)
        self.up_chain: Pipeline = plan.uplink_chain()
        self.down_chain: Pipeline = plan.downlink_chain()
        self.up_fingerprint = self.up_chain.fingerprint(self.layout)
        self.down_fingerprint = self.down_chain.fingerprint(self.layout)
        raw = self.layout.raw_bytes
        # An encoded update is never legitimately much larger than the raw model.
        self.max_update_bytes = 2 * raw + (1 << 20)
        self.max_decoder_bytes = 256 << 20
        self.on_round = on_round
        self.metrics = metrics if metrics is not None else Metrics("aggregator")
        self.metrics.track_active(self._active_count)
        self.up_codec, self.down_codec = str(self.up_chain), str(self.down_chain)

        self._cond = threading.Condition()
        self._collaborators: dict[str, Collaborator] = {}
        self._joined = 0
        self._round: RoundState | None = None
        self._phase = "waiting"  # waiting | prepass | training | done
        self._down_cache: tuple[int, WirePayload] | None = None
        self.prepass = Prepass(self)
        if self.prepass.enabled:
            self.max_decoder_bytes = self.prepass.max_bytes
        self.report = RunReport(
            path=report_path,
            header={
                "plan": plan.to_json(),
                "plan_sha256": plan.sha256,
                "model": {"name": plan.model.name, "parameters": self.layout.numel, "raw_bytes": raw},
                "uplink_chain": str(self.up_chain),
                "downlink_chain": str(self.down_chain),
            },
        )

    # -- membership -------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self._phase

    def active_ids(self) -> set[str]:
        return {c.id for c in self._collaborators.values() if c.active}

    def _active_count(self) -> int:
        with self._cond:
            return len(self.active_ids())

    def join(self, name: str, num_samples: int) -> JoinResult:
        if len(name) > MAX_NAME_LEN:
            raise InvalidArgument(f"name is longer than {MAX_NAME_LEN} characters")
        if num_samples < 0:
            raise InvalidArgument("num_samples must be >= 0")
        with self._cond:
            if self._phase == "done":
                raise FailedPrecondition("the federation has finished")
            index = self._joined
            self._joined += 1
            collab = Collaborator(
                id=f"c{index:04d}-{secrets.token_hex(3)}",
                token=secrets.token_urlsafe(24),
                name=name or f"collaborator-{index}",
                shard_index=index % self.plan.num_shards,
                num_samples=num_samples,
            )
            self._collaborators[collab.id] = collab
            self._cond.notify_all()
        log.info("joined: %s (%s), shard %d", collab.id, collab.name, collab.shard_index)
        return JoinResult(collab.id, collab.token, self.plan.canonical(), self.plan.sha256, collab.shard_index, self.plan.num_shards)

    def authenticate(self, collaborator_id: str, token: str) -> Collaborator:
        collab = self._collaborators.get(collaborator_id)
        if collab is None or not token:
            raise Unauthenticated("unknown collaborator or missing token: Join first")
        if not hmac.compare_digest(collab.token.encode(), token.encode()):
            raise Unauthenticated("invalid token for this collaborator")
        if not collab.active:
            raise FailedPrecondition("this collaborator has left the federation")
        return collab

    def leave(self, collaborator_id: str, token: str) -> None:
        collab = self.authenticate(collaborator_id, token)
        with self._cond:
            collab.active = False
            self._cond.notify_all()
        log.info("left: %s", collab.id)

    # -- downlink ---------------------------------------------------------------------------------
    def get_task(self, collaborator_id: str, token: str, wait_s: float) -> Task:
        collab = self.authenticate(collaborator_id, token)
        deadline = time.monotonic() + max(0.0, min(wait_s, 60.0))
        with self._cond:
            while True:
                if self._phase == "done":
                    return Task("DONE", message="the federation has finished")
                prepass_task = self.prepass.task_for(collab)
                if prepass_task is not None:
                    return prepass_task
                rnd = self._round
                if rnd is not None and collab.id in rnd.participants and collab.id not in rnd.submitted:
                    payload = rnd.sent.get(collab.id)
                    if payload is None:
                        payload = self._encode_downlink(collab, rnd.number)
                        rnd.sent[collab.id] = payload
                    rnd.bytes["down_raw"] += self.layout.raw_bytes
                    rnd.bytes["down_wire"] += payload_wire_size(payload)
                    self.metrics.record_transfer("down", self.down_codec, collab.id, raw=self.layout.raw_bytes, wire=payload_wire_size(payload))
                    return Task("TRAIN", round=rnd.number, model=payload)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Task("WAIT", message=f"waiting ({self._phase})")
                self._cond.wait(remaining)

    def _encode_downlink(self, collab: Collaborator, round_number: int) -> WirePayload:
        """The global model for one collaborator; stateless chains encode once per round."""
        if not self.down_chain.stateful and self._down_cache is not None and self._down_cache[0] == round_number:
            return self._down_cache[1]
        encoded = self.down_chain.encode(self.global_model, self.layout, collab.down_state)
        self.metrics.record_encode("down", self.down_codec, encoded.stats)
        payload = WirePayload(data=encoded.data, fingerprint=self.down_fingerprint)
        if not self.down_chain.stateful:
            self._down_cache = (round_number, payload)
        return payload

    # -- uplink -----------------------------------------------------------------------------------
    def submit_update(
        self,
        collaborator_id: str,
        token: str,
        round_number: int,
        num_samples: int,
        payload_blob: bytes,
        metrics: Mapping[str, float] | None = None,
    ) -> int:
        """Decode and fold in one update; returns its wire size."""
        collab = self.authenticate(collaborator_id, token)
        if not 1 <= num_samples <= 10**9:
            raise InvalidArgument(f"num_samples must be in [1, 1e9], got {num_samples}")
        if len(payload_blob) > self.max_update_bytes:
            raise InvalidArgument(f"update of {len(payload_blob)} bytes exceeds the limit of {self.max_update_bytes}")
        with self._cond:
            rnd = self._check_open(collab, round_number)
            rnd.receiving.add(collab.id)
        try:
            with collab.lock:
                payload = payload_from_bytes(payload_blob)
                chain, layout = payload.resolve(self.up_chain, self.layout)
                t0 = time.perf_counter()
                update = chain.decode(payload.data, layout, collab.up_state)
                self.metrics.record_decode("up", self.up_codec, time.perf_counter() - t0)
        except CodecError as exc:
            with self._cond:
                rnd.receiving.discard(collab.id)
            raise InvalidArgument(f"update rejected: {exc}") from exc
        wire = len(payload_blob)
        with self._cond:
            rnd.receiving.discard(collab.id)
            if self._round is not rnd:
                raise FailedPrecondition(f"round {round_number} closed while the update was being decoded")
            rnd.strategy.accumulate(update, float(num_samples))
            rnd.submitted.add(collab.id)
            rnd.bytes["up_raw"] += self.layout.raw_bytes
            rnd.bytes["up_wire"] += wire
            self.metrics.record_transfer("up", self.up_codec, collab.id, raw=self.layout.raw_bytes, wire=wire)
            collab.num_samples = num_samples
            self._cond.notify_all()
        log.debug("update from %s for round %d: %d bytes", collab.id, round_number, wire)
        return wire

    def _check_open(self, collab: Collaborator, round_number: int) -> RoundState:
        rnd = self._round
        if self._phase != "training" or rnd is None:
            raise FailedPrecondition(f"no round is open (phase: {self._phase})")
        if round_number != rnd.number:
            raise FailedPrecondition(f"update for round {round_number}, but round {rnd.number} is open")
        if collab.id not in rnd.participants:
            raise PermissionDenied(f"{collab.id} was not selected for round {rnd.number}")
        if collab.id in rnd.submitted or collab.id in rnd.receiving:
            raise AlreadyExists(f"duplicate update from {collab.id} for round {rnd.number}")
        return rnd

    def upload_decoder(self, collaborator_id: str, token: str, architecture: dict[str, Any], blob: bytes) -> int:
        """Envelope checks for the one-time decoder upload; aggregator/decoders.py validates and installs it."""
        collab = self.authenticate(collaborator_id, token)
        if len(blob) > self.max_decoder_bytes:
            raise InvalidArgument(f"decoder of {len(blob)} bytes exceeds the limit of {self.max_decoder_bytes}")
        stages = [s for s in self.up_chain.stages if getattr(s, "accepts_decoder", False)]
        if not stages:
            raise FailedPrecondition("this federation's uplink chain has no autoencoder stage: no decoder is expected")
        return self.prepass.upload(collab, architecture, blob)

    # -- the round loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        plan = self.plan
        self._wait_for_collaborators(stop)
        self.prepass.run(stop)
        loss, acc = self._evaluate()
        self.report.extra["initial_accuracy"] = acc
        self.report.write()
        for number in range(1, plan.rounds + 1):
            if stop.is_set():
                break
            record = self._run_round(number, stop)
            self.report.rounds.append(record)
            self.report.write()
            self.metrics.record_round(record, self.report.summary())
            if self.on_round is not None:
                self.on_round(record)
        with self._cond:
            self._phase = "done"
            self._round = None
            self._cond.notify_all()
        self.report.write()

    def _wait_for_collaborators(self, stop: threading.Event) -> None:
        need = self.plan.collaborators.min
        deadline = time.monotonic() + self.plan.collaborators.join_timeout_s
        with self._cond:
            while len(self.active_ids()) < need:
                if stop.is_set():
                    return
                if time.monotonic() > deadline:
                    raise FederationError(f"only {len(self.active_ids())} of {need} collaborators joined within the join timeout")
                self._cond.wait(0.5)

    def _select(self, number: int) -> set[str]:
        active = sorted(self.active_ids())
        c = self.plan.collaborators
        k = min(len(active), max(c.min_per_round, math.ceil(c.fraction * len(active))))
        rng = np.random.default_rng([self.plan.seed, number])
        return {active[i] for i in rng.choice(len(active), size=k, replace=False)} if k else set()

    def _run_round(self, number: int, stop: threading.Event) -> RoundRecord:
        with self._cond:
            participants = self._select(number)
            strategy = FedAvg(target=self.plan.uplink.target)
            strategy.begin(self.global_model)
            rnd = RoundState(number, participants, time.monotonic() + self.plan.round_timeout_s, strategy)
            self._round = rnd
            self._phase = "training"
            self._cond.notify_all()
            while not stop.is_set() and not rnd.complete(self.active_ids()) and time.monotonic() < rnd.deadline:
                self._cond.wait(0.25)
            # Wait briefly for updates already being decoded.
            grace = time.monotonic() + 5.0
            while rnd.receiving and time.monotonic() < grace:
                self._cond.wait(0.05)
            self._round = None
            dropped = len(participants - rnd.submitted)
            count = strategy.count
        status = "ok"
        if count == 0:
            status = "failed: no update arrived before the deadline"
        else:
            self.global_model = strategy.finish()
        loss, acc = self._evaluate()
        return RoundRecord(
            round=number,
            accuracy=acc,
            loss=loss,
            participants=count,
            dropped=dropped,
            seconds=time.monotonic() - rnd.started,
            bytes=dict(rnd.bytes),
            status=status,
        )

    def _evaluate(self) -> tuple[float, float]:
        set_flat(self.model, self.global_model)
        return evaluate(self.model, self.data.x_test, self.data.y_test)

    def shutdown(self) -> None:
        with self._cond:
            self._phase = "done"
            self._cond.notify_all()
