"""The federation plan: what every collaborator receives at Join.

A plan is JSON. Every field has a default, unknown fields are refused, and each value is
checked, so a malformed plan fails at start-up with a message naming the field. Example:

    {
      "task": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
      "model": {"name": "mlp"},
      "rounds": 20,
      "collaborators": {"min": 4, "fraction": 1.0, "min_per_round": 2},
      "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.1},
      "uplink": {"chain": "ef | topk:0.01 | qsgd:4 | entropy", "target": "delta"},
      "downlink": {"chain": "identity"}
    }
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fedsqueeze.codecs import CodecError, CodecState, Pipeline

if TYPE_CHECKING:
    from fedsqueeze.tasks import Dataset

DEFAULT_UPLINK = "ef | topk:0.01 | quantize:4 | entropy"
DEFAULT_DOWNLINK = "residual | topk:0.05 | quantize:8 | entropy"


class PlanError(ValueError):
    """The plan is malformed; the message names the field."""


@dataclass
class TaskSpec:
    dataset: str = "digits"  # digits | mnist1d | npz | mnist | cifar10
    data_path: str | None = None  # for npz/mnist/cifar10: where the aggregator's test set lives
    partition: str = "iid"  # iid | dirichlet
    alpha: float = 0.5  # Dirichlet concentration for label-skewed shards
    num_shards: int = 0  # built-in data sets are cut into this many shards (0: collaborators.min)
    num_samples: int = 0  # mnist1d only: samples to generate, 80 % train / 20 % test (0: the standard 5,000)


@dataclass
class ModelSpec:
    name: str = "mlp"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class CollaboratorsSpec:
    min: int = 2  # collaborators that must join before round 1
    fraction: float = 1.0  # fraction of active collaborators selected per round
    min_per_round: int = 1  # at least this many per round
    join_timeout_s: float = 600.0  # give up if `min` have not joined by then


@dataclass
class TrainingSpec:
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class UplinkSpec:
    # chain string or list of codec configs; the default: top-1 % with error feedback, 4-bit, range coded
    chain: Any = DEFAULT_UPLINK
    target: str = "delta"  # what is encoded: "delta" (local - global) or "weights" (the local model)


@dataclass
class DownlinkSpec:
    # encodes the global model; the default sends the sparsified, quantized change against the model
    # the collaborator already has (ResFed), which also corrects last round's downlink error
    chain: Any = DEFAULT_DOWNLINK
    # null, or a chain the aggregator passes each round's global update through before applying it
    # (server-side compression, e.g. "ef | topk:0.002"): the global model then moves only by what
    # this chain reconstructs, so a collaborator that missed rounds has few coordinates to catch up on
    update_chain: Any = None
    # "none" | "initial": a chain that starts with `residual` predicts a collaborator's first download
    # from the initial model, which both sides build from the plan's model and seed, so the first
    # download is the change since round 0 instead of the whole model (both need the same torch build)
    prior: str = "none"


@dataclass
class PrepassSpec:
    """The autoencoder prepass (seed 001 section 3); the AE fields also configure the chain's `ae` stage."""

    enabled: bool = False
    epochs: int = 5  # local epochs without aggregation
    snapshot_every: str = "epoch"  # epoch | batch
    what: str = "update"  # update: AE on deltas, with error feedback (hybrid) | weights: the paper's literal method
    span: int = 0  # update mode: snapshots between the two ends of a training delta (0: one round of local training)
    decoder: str = "per_collaborator"  # per_collaborator (case b) | shared (case a: trained by the first collaborator)
    variant: str = "dense"  # dense (the paper's FC AE) | chunked (one small AE shared by fixed-size chunks)
    hidden: list[int] = field(default_factory=list)  # funnel hidden widths (encoder side, mirrored)
    latent: int = 32  # latent size (per chunk when chunked)
    bits: int = 8  # bits per latent value on the wire
    correction: float = 0.002  # fraction of entries sent as a sparse correction of the AE's error
    chunk: int = 1024  # chunk length of the chunked variant
    ae_epochs: int = 300  # autoencoder training (eq. 3, MSE, Adam)
    ae_lr: float = 0.001
    allow_retrain: bool = False  # accept a second decoder upload from the same collaborator


SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi")


@dataclass
class ServerOptimizerSpec:
    """How the aggregate step moves the global model (aggregator/server_optimizer.py)."""

    name: str = "sgd"  # sgd (FedAvg: lr 1) | momentum (FedAvgM) | adam (FedAdam) | yogi (FedYogi)
    lr: float = 1.0  # server learning rate
    beta1: float = 0.9  # momentum / first-moment decay
    beta2: float = 0.99  # adam, yogi: second-moment decay
    tau: float = 1e-3  # adam, yogi: added to sqrt(v), bounds the step of coordinates that rarely move

    @property
    def is_plain(self) -> bool:
        """FedAvg's own rule: the strategy's proposal is applied unchanged."""
        return self.name == "sgd" and self.lr == 1.0

    def problem(self) -> str | None:
        """What is wrong with these values, or None."""
        if self.name not in SERVER_OPTIMIZERS:
            return f"aggregation.server_optimizer.name must be one of {list(SERVER_OPTIMIZERS)}, got {self.name!r}"
        if not (math.isfinite(self.lr) and self.lr > 0):
            return f"aggregation.server_optimizer.lr must be > 0, got {self.lr}"
        if not 0 <= self.beta1 < 1:
            return f"aggregation.server_optimizer.beta1 must be in [0, 1), got {self.beta1}"
        if not 0 < self.beta2 < 1:
            return f"aggregation.server_optimizer.beta2 must be in (0, 1), got {self.beta2}"
        if not (math.isfinite(self.tau) and self.tau > 0):
            return f"aggregation.server_optimizer.tau must be > 0, got {self.tau}"
        return None


@dataclass
class AggregationSpec:
    """How the updates of a round are combined (aggregator/strategy.py) and applied (aggregator/server_optimizer.py)."""

    clip_norm: float | None = None  # clip each update's L2 norm (of the delta from the global model) to this
    robust: str | None = None  # null: FedAvg (streaming) | "median" | "trimmed_mean" (keep every update of a round)
    trim_fraction: float = 0.1  # trimmed_mean: fraction cut at each end per coordinate
    server_optimizer: ServerOptimizerSpec = field(default_factory=ServerOptimizerSpec)


@dataclass
class Plan:
    task: TaskSpec = field(default_factory=TaskSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    rounds: int = 20
    seed: int = 0
    collaborators: CollaboratorsSpec = field(default_factory=CollaboratorsSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    uplink: UplinkSpec = field(default_factory=UplinkSpec)
    downlink: DownlinkSpec = field(default_factory=DownlinkSpec)
    prepass: PrepassSpec = field(default_factory=PrepassSpec)
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    round_timeout_s: float = 300.0  # the round's deadline: updates after it are refused, missing ones dropped
    quorum: int = 1  # accepted updates a round needs; fewer by the deadline: retry or fail
    round_retries: int = 0  # a round that misses quorum is re-opened this many times (keeping its updates)
    keep_serving: bool = False

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        plan = _build(cls, data, "plan")
        plan.validate()
        return plan

    @classmethod
    def from_text(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_json(data)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc.strerror}") from exc
        return cls.from_text(text)

    # -- checks ---------------------------------------------------------------------------------
    def uplink_chain(self) -> Pipeline:
        from fedsqueeze.codecs.autoencoder import chain_with_prepass

        return Pipeline.from_config(chain_with_prepass(self.uplink.chain, dataclasses.asdict(self.prepass)))

    def downlink_chain(self) -> Pipeline:
        return Pipeline.from_config(self.downlink.chain)

    def downlink_update_chain(self) -> Pipeline | None:
        return None if self.downlink.update_chain is None else Pipeline.from_config(self.downlink.update_chain)

    def downlink_state(self, chain: Pipeline, initial_model: np.ndarray | None) -> CodecState:
        """A new downlink CodecState for one collaborator (either side), primed when `downlink.prior` is "initial"."""
        state = CodecState()
        if self.downlink.prior == "initial":
            if initial_model is None:
                raise ValueError("downlink.prior is 'initial' but no initial model was given")
            chain.prime(state, initial_model)
        return state

    def load_data(self) -> Dataset:
        """The plan's data set, as every process of the federation loads it."""
        from fedsqueeze.tasks import load_dataset

        return load_dataset(self.task.dataset, self.task.data_path, self.seed, self.task.num_samples)

    @property
    def num_shards(self) -> int:
        return self.task.num_shards or self.collaborators.min

    def validate(self) -> None:
        from fedsqueeze.models import MODELS
        from fedsqueeze.tasks import DATASETS

        _check(self.task.dataset in DATASETS, f"task.dataset must be one of {sorted(DATASETS)}, got {self.task.dataset!r}")
        _check(self.task.partition in ("iid", "dirichlet"), f"task.partition must be 'iid' or 'dirichlet', got {self.task.partition!r}")
        _check(self.task.alpha > 0, "task.alpha must be > 0")
        _check(self.task.num_shards >= 0, "task.num_shards must be >= 0")
        _check(self.task.num_samples == 0 or self.task.dataset == "mnist1d", "task.num_samples applies to the mnist1d data set only")
        _check(self.task.num_samples == 0 or 100 <= self.task.num_samples <= 2_000_000, "task.num_samples must be 0 or in [100, 2000000]")
        _check(self.model.name in MODELS, f"model.name must be one of {sorted(MODELS)}, got {self.model.name!r}")
        _check(1 <= self.rounds <= 1_000_000, f"rounds must be in [1, 1000000], got {self.rounds}")
        c = self.collaborators
        _check(c.min >= 1, "collaborators.min must be >= 1")
        _check(0 < c.fraction <= 1, "collaborators.fraction must be in (0, 1]")
        _check(c.min_per_round >= 1, "collaborators.min_per_round must be >= 1")
        _check(c.join_timeout_s > 0, "collaborators.join_timeout_s must be > 0")
        t = self.training
        _check(t.local_epochs >= 0, "training.local_epochs must be >= 0")
        _check(t.batch_size >= 1, "training.batch_size must be >= 1")
        _check(t.lr > 0, "training.lr must be > 0")
        _check(self.uplink.target in ("delta", "weights"), f"uplink.target must be 'delta' or 'weights', got {self.uplink.target!r}")
        _check(self.prepass.snapshot_every in ("epoch", "batch"), "prepass.snapshot_every must be 'epoch' or 'batch'")
        _check(self.prepass.epochs >= 1, "prepass.epochs must be >= 1")
        _check(self.round_timeout_s > 0, "round_timeout_s must be > 0")
        _check(self.quorum >= 1, "quorum must be >= 1")
        _check(0 <= self.round_retries <= 1000, "round_retries must be in [0, 1000]")
        a = self.aggregation
        _check(a.clip_norm is None or a.clip_norm > 0, "aggregation.clip_norm must be > 0 or null")
        _check(a.robust in (None, "median", "trimmed_mean"), f"aggregation.robust must be null, 'median' or 'trimmed_mean', got {a.robust!r}")
        _check(0 <= a.trim_fraction < 0.5, "aggregation.trim_fraction must be in [0, 0.5)")
        optimizer_problem = a.server_optimizer.problem()
        _check(optimizer_problem is None, optimizer_problem or "")
        _check(self.downlink.prior in ("none", "initial"), f"downlink.prior must be 'none' or 'initial', got {self.downlink.prior!r}")
        if self.downlink.prior == "initial":
            try:
                chain = self.downlink_chain()
            except CodecError:
                chain = None  # reported below
            _check(chain is None or chain.primable, f"downlink.prior 'initial' needs a downlink chain that starts with 'residual', got '{chain}'")
        for name, build in (("uplink.chain", self.uplink_chain), ("downlink.chain", self.downlink_chain),
                            ("downlink.update_chain", self.downlink_update_chain)):  # fmt: skip
            try:
                build()
            except CodecError as exc:
                raise PlanError(f"{name}: {exc}") from exc
        from fedsqueeze.codecs.autoencoder import check_plan

        problem = check_plan(self)
        _check(problem is None, problem or "")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(message)


T = TypeVar("T")


def _build(cls: type[T], data: Any, where: str) -> T:
    """Build a dataclass from JSON, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise PlanError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name, value in data.items():
        hint = str(hints[name])
        nested = _NESTED.get(hint)
        if nested is not None:
            kwargs[name] = _build(nested, value, f"{where}.{name}" if where != "plan" else name)
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}" if where != "plan" else name)
    return cls(**kwargs)


def _coerce(value: Any, hint: str, where: str) -> Any:
    if hint == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanError(f"{where} must be an integer, got {value!r}")
    elif hint == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PlanError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif hint == "bool":
        if not isinstance(value, bool):
            raise PlanError(f"{where} must be true or false, got {value!r}")
    elif hint == "str":
        if not isinstance(value, str):
            raise PlanError(f"{where} must be a string, got {value!r}")
    elif hint == "float | None":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise PlanError(f"{where} must be a number or null, got {value!r}")
        value = None if value is None else float(value)
    elif hint == "str | None":
        if value is not None and not isinstance(value, str):
            raise PlanError(f"{where} must be a string or null, got {value!r}")
    elif hint.startswith("dict"):
        if not isinstance(value, dict):
            raise PlanError(f"{where} must be a JSON object, got {value!r}")
    return value


_NESTED: dict[str, type] = {
    "TaskSpec": TaskSpec,
    "ModelSpec": ModelSpec,
    "CollaboratorsSpec": CollaboratorsSpec,
    "TrainingSpec": TrainingSpec,
    "UplinkSpec": UplinkSpec,
    "DownlinkSpec": DownlinkSpec,
    "PrepassSpec": PrepassSpec,
    "AggregationSpec": AggregationSpec,
    "ServerOptimizerSpec": ServerOptimizerSpec,
}
