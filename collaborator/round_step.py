"""One collaborator round: decode the download, train, encode the update, submit it.

The one implementation of a collaborator's work in a round, used by the `collaborator join`
runner (over gRPC), the in-process simulation and the benchmarks (straight into a Federation):

1. The download is checked against the plan's downlink chain and layout and decoded with this
   collaborator's downlink state (the residual's copy of what it holds): the global model.
2. The trainer trains from it (`BuiltinTrainer`: the plan's SGD on the local shard, seeded by
   `training_seed`, so a round trained again gives the same update).
3. The update (local - global, or the local model for `uplink.target: weights`) is encoded with
   the uplink chain and this collaborator's uplink state (error feedback), and submitted.

Resuming: the codec states are snapshotted before each round's model is decoded. A TRAIN task for
the round just handled (the aggregator restarted from a checkpoint before it) restores that
snapshot, so both sides' states match again. An update the aggregator refuses because its round
closed or it was not ours (FAILED_PRECONDITION, PERMISSION_DENIED, UNAUTHENTICATED) rolls the
uplink state back and is dropped. An update that was taken goes to `on_submitted` (the autoencoder's
drift monitor, `prepass.DriftMonitor`, which may re-train it and re-upload its decoder).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import CodecError, CodecState, EncodeStats, Layout
from fedsqueeze.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from fedsqueeze.messages import Evaluation, Task
from fedsqueeze.metrics import Metrics
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan

if TYPE_CHECKING:
    from fedsqueeze.qat import WeightQuantizer

log = logging.getLogger("fedsqueeze.collaborator")

#: (round, num_samples, payload, training metrics, evaluation) -> wire bytes accepted; raises the aggregator's
#: domain errors.
Submit = Callable[[int, int, Payload, dict[str, float], Evaluation | None], int]


def training_seed(plan: Plan, round_number: int, shard_index: int) -> int:
    """The seed of a collaborator's local training in a round, the same on every run of the plan."""
    return plan.seed * 100_003 + round_number * 1009 + shard_index


def prepass_seed(plan: Plan, shard_index: int) -> int:
    """The seed of a collaborator's prepass training (seed 001's local epochs without aggregation)."""
    return plan.seed * 100_003 + 7919 + shard_index


class Trainer(Protocol):
    """Local training: from the global model's weights to the local model's, with metrics."""

    @property
    def num_samples(self) -> int:
        """The FedAvg weight this collaborator declares."""

    def train(self, weights: np.ndarray, round_number: int) -> tuple[np.ndarray, dict[str, float]]: ...


@dataclass
class BuiltinTrainer:
    """The plan's training (fedsqueeze/training.py: SGD, cross-entropy) of a torch model on local arrays."""

    plan: Plan
    model: Any  # torch.nn.Module
    x: np.ndarray
    y: np.ndarray
    shard_index: int
    # training.qat's quantizer (None: plain float training); built once, it holds the model's layout
    quantizer: WeightQuantizer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        from fedsqueeze.qat import WeightQuantizer, qat_chain

        chain = qat_chain(self.plan.training.qat)
        self.quantizer = None if chain is None else WeightQuantizer.of(self.model, chain)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def fit(self, round_number: int) -> dict[str, float]:
        """Train the model in place for one round; its metrics."""
        from fedsqueeze.training import train_local

        t = self.plan.training
        return train_local(self.model, self.x, self.y, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                           weight_decay=t.weight_decay, seed=training_seed(self.plan, round_number, self.shard_index),
                           quantizer=self.quantizer, steps=t.local_steps, optimizer=t.optimizer)  # fmt: skip

    def train(self, weights: np.ndarray, round_number: int) -> tuple[np.ndarray, dict[str, float]]:
        from fedsqueeze.models import get_flat, set_flat

        set_flat(self.model, weights)
        metrics = self.fit(round_number)
        return get_flat(self.model), metrics


@dataclass
class LinkStates:
    """The collaborator's end of its two links."""

    up: CodecState  # sender side of the uplink: error feedback, predictors
    down: CodecState  # receiver side of the downlink: the residual's copy of the global model

    def snapshot(self) -> tuple[CodecState, CodecState]:
        """Forks of both states: no copy of their arrays, which stages replace and never write into."""
        return self.up.fork(), self.down.fork()

    def restore(self, snapshot: tuple[CodecState, CodecState]) -> None:
        self.up, self.down = snapshot[0].fork(), snapshot[1].fork()


@dataclass
class RoundRecord:
    """What one round sent and received, for the collaborator's report (it must add up to the aggregator's)."""

    round: int
    up_raw: int
    up_wire: int
    down_raw: int
    down_wire: int
    nmse: float  # the uplink's reconstruction error, as the aggregator decodes it
    encode_seconds: float
    seconds: float
    train_metrics: dict[str, float] = field(default_factory=dict)
    encode_stats: EncodeStats | None = None
    evaluation: dict[str, float] = field(
        default_factory=dict
    )  # its evaluation of the global model it was sent

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "up_raw": self.up_raw, "up_wire": self.up_wire, "down_raw": self.down_raw,
                "down_wire": self.down_wire, "nmse": self.nmse, "encode_seconds": self.encode_seconds, "seconds": self.seconds,
                **{f"train_{k}": v for k, v in self.train_metrics.items()},
                **{f"eval_{k}": v for k, v in self.evaluation.items()}}  # fmt: skip


@dataclass
class Download:
    """A round's global model, decoded: what the collaborator trains from."""

    round: int
    weights: np.ndarray  # flat float32, in the federation's layout order
    wire: int  # the download's wire bytes
    started: float  # perf_counter at its decoding, for the round's duration


class RoundStep:
    """A collaborator's round, in two halves: `begin` (the download decoded) and `finish` (the update encoded
    and submitted). `run` puts a `Trainer` between them; the collaborator API (api.py) puts the user's own
    training loop there."""

    def __init__(
        self,
        plan: Plan,
        chains: LinkChains,
        layout: Layout,
        trainer: Trainer | None,
        states: LinkStates,
        submit: Submit,
        *,
        member_id: str = "",
        metrics: Metrics | None = None,
    ) -> None:
        self.plan, self.chains, self.layout = plan, chains, layout
        self.trainer = trainer
        self.states = states
        self.submit = submit
        self.member_id = member_id
        self.metrics = metrics
        self.up_fingerprint = chains.uplink.fingerprint(layout)
        self.up_codec, self.down_codec = str(chains.uplink), str(chains.downlink)
        # (round, the states before that round)
        self._snapshot: tuple[int, tuple[CodecState, CodecState]] | None = None
        # called with (round, update) once the aggregator has taken an update (prepass.DriftMonitor)
        self.on_submitted: Callable[[int, np.ndarray], None] | None = None

    def decode_download(self, payload: Payload) -> np.ndarray:
        """The global model from a download, advancing the downlink state."""
        payload.check(self.chains.downlink, self.layout, "download refused")
        try:
            return self.chains.downlink.decode(payload.data, self.layout, self.states.down)
        except CodecError as exc:
            raise InvalidArgument(f"download refused: {exc}") from exc

    def begin(self, task: Task) -> Download:
        """Decode a TRAIN task's global model (a round handed out again restores the states of its first time)."""
        assert task.kind == "TRAIN" and task.model is not None
        if self._snapshot is not None and self._snapshot[0] == task.round:
            log.warning(
                "round %d again (the aggregator resumed from its checkpoint): restoring the codec states",
                task.round,
            )
            self.states.restore(self._snapshot[1])
        else:
            self._snapshot = (task.round, self.states.snapshot())
        t0 = time.perf_counter()
        weights = self.decode_download(task.model)
        wire = task.model.wire_size
        if self.metrics is not None:
            self.metrics.record_decode("down", self.down_codec, time.perf_counter() - t0)
            self.metrics.record_transfer(
                "down", self.down_codec, self.member_id, raw=self.layout.raw_bytes, wire=wire
            )
        return Download(task.round, weights, wire, t0)

    def finish(
        self,
        download: Download,
        local: np.ndarray,
        num_samples: int,
        train_metrics: Mapping[str, Any] | None = None,
        evaluation: Evaluation | None = None,
    ) -> RoundRecord | None:
        """Encode the update (local - global, or the local model) and submit it; None when the aggregator did
        not take it (the round closed, or it is no longer ours: its uplink state is rolled back)."""
        train_metrics = dict(train_metrics or {})
        raw = self.layout.raw_bytes
        x = local - download.weights if self.plan.uplink.target == "delta" else local
        encoded = self.chains.uplink.encode(x, self.layout, self.states.up)
        if self.metrics is not None:
            self.metrics.record_encode("up", self.up_codec, encoded.stats)
        payload = Payload(data=encoded.data, fingerprint=self.up_fingerprint)
        try:
            wire = self.submit(download.round, num_samples, payload, _floats(train_metrics), evaluation)
        except (FailedPrecondition, PermissionDenied, Unauthenticated) as exc:
            if self.metrics is not None:
                self.metrics.record_message("up", "update", exc.status)
            log.warning("round %d: update not accepted (%s); going on", download.round, exc)
            assert self._snapshot is not None
            self.states.up = self._snapshot[1][0].fork()
            return None
        if self.metrics is not None:
            self.metrics.record_transfer("up", self.up_codec, self.member_id, raw=raw, wire=wire)
        record = RoundRecord(download.round, raw, wire, raw, download.wire, encoded.stats.nmse, encoded.stats.seconds,
                             time.perf_counter() - download.started, _floats(train_metrics), encoded.stats,
                             dict(evaluation.metrics) if evaluation else {})  # fmt: skip
        if self.on_submitted is not None:
            self.on_submitted(download.round, x)
        return record

    def run(self, task: Task) -> RoundRecord | None:
        """Handle one TRAIN task with the step's trainer."""
        assert self.trainer is not None, (
            "run() needs a trainer; the collaborator API uses begin() and finish()"
        )
        download = self.begin(task)
        t_train = time.perf_counter()
        local, train_metrics = self.trainer.train(download.weights, task.round)
        if self.metrics is not None:
            self.metrics.record_training(task.round, time.perf_counter() - t_train, train_metrics.get("loss"))
        return self.finish(download, local, self.trainer.num_samples, train_metrics)


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
