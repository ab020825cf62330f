"""The federation plan: what every collaborator receives at Join. Pure data: no chains, models or data sets.

A plan is JSON. Every field is declared once, here, with its type, its default and (for numbers)
its range (`Range` in the field's `Annotated` type). Parsing is driven by those declarations:
unknown fields are refused, every value is checked against its declared type (lists element by
element, `Literal` choices by value) and range, so a malformed plan fails at start-up with a
message naming the field. The autoencoder's settings are the codec's own (`AutoencoderSettings`,
inherited by `PrepassSpec`). Example:

    {
      "task": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
      "model": {"name": "mlp"},
      "rounds": 20,
      "collaborators": {"min": 4, "fraction": 1.0, "min_per_round": 2},
      "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.1},
      "uplink": {"chain": "ef | topk:0.01 | qsgd:4 | entropy", "target": "delta"},
      "downlink": {"chain": "identity"}
    }

What a plan means at run time (the codec chains it names, the data set, the model) is built by
`fedsqueeze.chains`, `fedsqueeze.tasks` and `fedsqueeze.models`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from fedsqueeze.codecs import Chain, CodecError
from fedsqueeze.codecs.autoencoder import AutoencoderSettings, chain_with_prepass

DEFAULT_UPLINK = "ef | topk:0.01 | quantize:4 | entropy"
DEFAULT_DOWNLINK = "residual | topk:0.05 | quantize:8 | entropy"

#: A codec chain as a plan writes it: a string (`"fp16 | zstd:3"`) or a list of codec configs.
ChainConfig = str | list[dict[str, Any]]


class PlanError(ValueError):
    """The plan is malformed; the message names the field."""


@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric plan field (None: unbounded on that side)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` ("must be in [0, 1)"), or None."""
        ok = (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"must be {self.describe()}"

    def describe(self) -> str:
        low = (
            f"[{_fmt(self.ge)}"
            if self.ge is not None
            else f"({_fmt(self.gt)}"
            if self.gt is not None
            else None
        )
        high = (
            f"{_fmt(self.le)}]"
            if self.le is not None
            else f"{_fmt(self.lt)})"
            if self.lt is not None
            else None
        )
        if low is not None and high is not None:
            return f"in {low}, {high}"
        if low is not None:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high is not None:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return "finite"


def _fmt(v: float | None) -> str:
    assert v is not None
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


Positive = Range(gt=0)
NonNegative = Range(ge=0)
AtLeastOne = Range(ge=1)
Fraction = Range(ge=0, le=1)


@dataclass
class TaskSpec:
    # a built-in data set (fedsqueeze.tasks.DATASETS: digits | mnist1d | npz | mnist | cifar10), or any name
    # when the collaborators run apps of their own (`collaborator join --app`), which bring their data
    dataset: str = "digits"
    data_path: str | None = None  # for npz/mnist/cifar10: where the aggregator's test set lives
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: Annotated[float, Positive] = 0.5  # Dirichlet concentration for label-skewed shards
    # built-in data sets are cut into this many shards (0: collaborators.min)
    num_shards: Annotated[int, NonNegative] = 0
    # mnist1d only: samples to generate, 80 % train / 20 % test (0: the standard 5,000)
    num_samples: Annotated[int, Range(ge=0, le=2_000_000)] = 0


@dataclass
class ModelSpec:
    # a built-in model (fedsqueeze.models.MODELS: mlp | cnn), or any name for a model of the collaborators'
    # own (`collaborator join --app`; the aggregator then starts from `--initial-model`). Never code to load.
    name: str = "mlp"
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a built-in model
    # what of a model's floating-point buffers (BatchNorm statistics) travels: "average" (aggregated like
    # the weights) or "local" (FedBN: each collaborator keeps its own); integer buffers never travel
    buffers: Literal["average", "local"] = "average"


@dataclass
class CollaboratorsSpec:
    min: Annotated[int, AtLeastOne] = 2  # collaborators that must join before round 1
    max: Annotated[int, NonNegative] = 0  # members at most (joined and not left); 0: 10 x min
    fraction: Annotated[float, Range(gt=0, le=1)] = 1.0  # fraction of active collaborators selected per round
    min_per_round: Annotated[int, AtLeastOne] = 1  # at least this many per round
    join_timeout_s: Annotated[float, Positive] = 600.0  # give up if `min` have not joined by then


@dataclass
class TrainingSpec:
    local_epochs: Annotated[int, NonNegative] = 2
    # > 0: this many local batches per round instead of whole epochs (a language model's shard holds
    # more windows than a round should visit)
    local_steps: Annotated[int, NonNegative] = 0
    # "adam": local Adam (fresh each round; `momentum` unused), which transformers train well with
    optimizer: Literal["sgd", "adam"] = "sgd"
    batch_size: Annotated[int, AtLeastOne] = 32
    lr: Annotated[float, Positive] = 0.05
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, NonNegative] = 0.0
    # quantization-aware training (seed 003, fedsqueeze/qat.py): a stateless chain the weights pass through in
    # every forward pass, e.g. "sign" (BinaryConnect) or "quantize:4,granularity=layer,grid=minmax"; "" = off
    qat: str = ""


@dataclass
class UplinkSpec:
    # the default: top-1 % with error feedback, 4-bit, range coded
    chain: ChainConfig = DEFAULT_UPLINK
    target: Literal["delta", "weights"] = "delta"  # what is encoded: local - global, or the local model


@dataclass
class DownlinkSpec:
    # encodes the global model; the default sends the sparsified, quantized change against the model
    # the collaborator already has (ResFed), which also corrects last round's downlink error
    chain: ChainConfig = DEFAULT_DOWNLINK
    # null, or a chain the aggregator passes each round's global update through before applying it
    # (server-side compression, e.g. "ef | topk:0.002"): the global model then moves only by what
    # this chain reconstructs, so a collaborator that missed rounds has few coordinates to catch up on
    update_chain: ChainConfig | None = None
    # "initial": a chain that starts with `residual` predicts a collaborator's first download from the
    # initial model, which both sides build from the plan's model and seed, so the first download is
    # the change since round 0 instead of the whole model (both need the same torch build)
    prior: Literal["none", "initial"] = "none"


@dataclass
class PrepassSpec(AutoencoderSettings):
    """The autoencoder prepass (seed 001 section 3). The AE's own settings (variant, what, hidden,
    latent, bits, correction, chunk, refine) are inherited from the codec and configure the `ae` stage."""

    enabled: bool = False
    epochs: Annotated[int, AtLeastOne] = 5  # local epochs without aggregation
    snapshot_every: Literal["epoch", "batch"] = "epoch"
    # update mode: snapshots between the two ends of a delta (0: one round)
    span: Annotated[int, NonNegative] = 0
    # case b | case a (trained by the first to join)
    decoder: Literal["per_collaborator", "shared"] = "per_collaborator"
    ae_epochs: Annotated[int, AtLeastOne] = 300  # autoencoder training (eq. 3, MSE, Adam)
    ae_lr: Annotated[float, Positive] = 0.001
    allow_retrain: bool = False  # accept a second decoder upload from the same collaborator
    max_retrains: Annotated[int, NonNegative] = (
        3  # with allow_retrain: re-uploads per collaborator after its first
    )
    # dynamic re-training (seed 001 4.2): a collaborator re-trains its AE on its recent updates and re-uploads the
    # decoder when the AE part's NMSE on its own messages, averaged over `retrain_window` rounds, exceeds this; null: never
    retrain_nmse: Annotated[float | None, Positive] = None
    retrain_window: Annotated[int, AtLeastOne] = 3  # rounds the NMSE is averaged over
    retrain_updates: Annotated[int, AtLeastOne] = 10  # the recent updates the AE is re-trained on
    # codec chain the decoder upload travels through (e.g. "quantize:8,granularity=layer | entropy"); "" = raw fp32
    decoder_chain: str = ""


ServerOptimizerName = Literal["sgd", "momentum", "adam", "yogi"]
SERVER_OPTIMIZERS: tuple[str, ...] = get_args(ServerOptimizerName)


@dataclass
class ServerOptimizerSpec:
    """How the aggregate step moves the global model (aggregator/server_optimizer.py)."""

    # sgd (FedAvg: lr 1) | momentum (FedAvgM) | adam (FedAdam) | yogi (FedYogi)
    name: ServerOptimizerName = "sgd"
    lr: Annotated[float, Positive] = 1.0  # server learning rate
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9  # momentum / first-moment decay
    beta2: Annotated[float, Range(gt=0, lt=1)] = 0.99  # adam, yogi: second-moment decay
    # adam, yogi: added to sqrt(v), bounds the step of coordinates that rarely move
    tau: Annotated[float, Positive] = 1e-3

    @property
    def is_plain(self) -> bool:
        """FedAvg's own rule: the strategy's proposal is applied unchanged."""
        return self.name == "sgd" and self.lr == 1.0


@dataclass
class AggregationSpec:
    """How the updates of a round are combined (aggregator/strategy.py) and applied (aggregator/server_optimizer.py)."""

    clip_norm: Annotated[float | None, Positive] = None  # clip each update's L2 norm (of the delta) to this
    # FedAvg: the round's most influential update (weight x norm) is scaled to at most this many times the
    # median delta norm of the others (alone in its round: of the last rounds'); null: off
    norm_bound: Annotated[float | None, Range(ge=1)] = 5.0
    # FedAvg weights: declared sample counts (capped, below) or all equal
    weighting: Literal["samples", "equal"] = "samples"
    # a cap on every declared sample count; built-in data sets also cap each at the shard the aggregator assigned
    max_samples: Annotated[int | None, AtLeastOne] = None
    # null: FedAvg (streaming); robust rules keep every update
    robust: Literal["median", "trimmed_mean"] | None = None
    # trimmed_mean: fraction cut at each end per coordinate
    trim_fraction: Annotated[float, Range(ge=0, lt=0.5)] = 0.1
    server_optimizer: ServerOptimizerSpec = field(default_factory=ServerOptimizerSpec)


@dataclass
class Plan:
    task: TaskSpec = field(default_factory=TaskSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    rounds: Annotated[int, Range(ge=1, le=1_000_000)] = 20
    seed: int = 0
    collaborators: CollaboratorsSpec = field(default_factory=CollaboratorsSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    uplink: UplinkSpec = field(default_factory=UplinkSpec)
    downlink: DownlinkSpec = field(default_factory=DownlinkSpec)
    prepass: PrepassSpec = field(default_factory=PrepassSpec)
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    # the round's deadline: later updates are refused, missing ones dropped
    round_timeout_s: Annotated[float, Positive] = 300.0
    # accepted updates a round needs; fewer by the deadline: retry or fail
    quorum: Annotated[int, AtLeastOne] = 1
    # a round that misses quorum is re-opened this many times
    round_retries: Annotated[int, Range(ge=0, le=1000)] = 0
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
        plan = build_spec(cls, data, "plan")
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

    @property
    def num_shards(self) -> int:
        return self.task.num_shards or self.collaborators.min

    @property
    def max_members(self) -> int:
        return self.collaborators.max or 10 * self.collaborators.min

    @property
    def uplink_chain_config(self) -> Any:
        """The uplink chain as configured, with an `ae` stage's unset settings taken from `prepass`."""
        return chain_with_prepass(self.uplink.chain, self.prepass)

    # -- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field against its declaration, then what involves several fields."""
        check_spec(self, "plan")
        _check(bool(self.task.dataset.strip()), "task.dataset must not be empty")
        _check(bool(self.model.name.strip()), "model.name must not be empty")
        _check(
            self.task.num_samples == 0 or self.task.dataset == "mnist1d",
            "task.num_samples applies to the mnist1d data set only",
        )
        _check(
            self.task.num_samples == 0 or self.task.num_samples >= 100,
            "task.num_samples must be 0 or in [100, 2000000]",
        )
        _check(self.collaborators.max == 0 or self.collaborators.max >= self.collaborators.min,
               f"collaborators.max ({self.collaborators.max}) must be 0 or at least collaborators.min ({self.collaborators.min})")  # fmt: skip
        chains: dict[str, Chain | None] = {}
        for name, config in (("uplink.chain", self.uplink_chain_config), ("downlink.chain", self.downlink.chain),
                             ("downlink.update_chain", self.downlink.update_chain)):  # fmt: skip
            try:
                chains[name] = None if config is None else Chain.from_config(config)
            except CodecError as exc:
                raise PlanError(f"{name}: {exc}") from exc
        down = chains["downlink.chain"]
        if self.downlink.prior == "initial":
            _check(
                down is not None and down.primable,
                f"downlink.prior 'initial' needs a downlink chain that starts with 'residual', got '{down}'",
            )
        uplink = chains["uplink.chain"]
        assert uplink is not None
        from fedsqueeze.codecs.autoencoder import find_stage

        found = find_stage(uplink)
        if self.prepass.enabled:
            _check(found is not None, "prepass.enabled needs an `ae` stage in uplink.chain")
        from fedsqueeze.codecs.autoencoder import decoder_chain

        try:
            decoder_chain(self.prepass.decoder_chain)
        except CodecError as exc:
            raise PlanError(f"prepass.decoder_chain: {exc}") from exc
        from fedsqueeze.qat import qat_chain

        try:
            qat_chain(self.training.qat)
        except CodecError as exc:
            raise PlanError(f"training.qat: {exc}") from exc
        if self.prepass.retrain_nmse is not None:
            _check(self.prepass.allow_retrain, "prepass.retrain_nmse needs prepass.allow_retrain: true")
            _check(self.prepass.max_retrains >= 1, "prepass.retrain_nmse needs prepass.max_retrains >= 1")
            _check(
                self.prepass.decoder == "per_collaborator",
                "prepass.retrain_nmse needs prepass.decoder 'per_collaborator' (a shared decoder serves everyone's encoders)",
            )
        if found is not None:
            _check(
                self.prepass.enabled,
                "the uplink chain's `ae` stage needs prepass.enabled: true (the prepass trains the autoencoder)",
            )
            want = "delta" if found[1].what == "update" else "weights"
            _check(
                self.uplink.target == want,
                f"the `ae` stage encodes {found[1].what!r}: uplink.target must be {want!r}",
            )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(message)


# -- declaration-driven parsing and checking -----------------------------------------------------
T = TypeVar("T")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _unwrap(tp: Any) -> tuple[Any, Range | None]:
    """(type, range) of a possibly `Annotated` declaration."""
    if get_origin(tp) is Annotated:
        base, *extras = get_args(tp)
        return base, next((e for e in extras if isinstance(e, Range)), None)
    return tp, None


def _where(parent: str, name: str) -> str:
    return name if parent == "plan" else f"{parent}.{name}"


def build_spec(cls: type[T], data: Any, where: str) -> T:
    """A spec dataclass from JSON: unknown keys refused, every value checked against its declaration."""
    if not isinstance(data, dict):
        raise PlanError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = set(data) - set(names)
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {name: coerce(value, hints[name], _where(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except CodecError as exc:  # the autoencoder settings check themselves
        raise PlanError(f"{where}: {exc}") from exc


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (parsed JSON) as declared by `tp`, or PlanError naming `where`."""
    base, bounds = _unwrap(tp)
    out = _coerce_type(value, base, where)
    if bounds is not None and isinstance(out, int | float) and not isinstance(out, bool):
        problem = bounds.problem(out)
        if problem is not None:
            raise PlanError(f"{where} {problem}, got {value!r}")
    return out


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return f"one of {list(get_args(tp))}"
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if get_origin(tp) is dict or tp is dict:
        return "a JSON object"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce_type(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build_spec(tp, value, where)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise PlanError(f"{where} must be {_describe(tp)}, got null")
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce_type(value, option, where)
            except PlanError:
                continue
        raise PlanError(f"{where} must be {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool):
            raise PlanError(f"{where} must be {_describe(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise PlanError(f"{where} must be {_describe(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise PlanError(f"{where} must be a JSON object, got {value!r}")
        args = get_args(tp)
        return (
            {k: _coerce_type(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise PlanError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PlanError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise PlanError(f"{where} must be a string, got {value!r}")
        return value
    # a bug in this module, not bad input
    raise TypeError(f"plan field {where}: unsupported declaration {tp!r}")


def check_spec(spec: Any, where: str) -> None:
    """Check a spec built in code (not parsed) against its declarations, recursively."""
    for f in dataclasses.fields(spec):
        tp = _hints(type(spec))[f.name]
        value = getattr(spec, f.name)
        name = _where(where, f.name)
        if dataclasses.is_dataclass(value):
            check_spec(value, name)
        else:
            coerce(json.loads(json.dumps(value)), tp, name)
    if isinstance(spec, AutoencoderSettings):
        try:
            AutoencoderSettings.__post_init__(spec)
        except CodecError as exc:
            raise PlanError(f"{where}: {exc}") from exc
