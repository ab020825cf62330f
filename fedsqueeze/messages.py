"""The messages of the federation protocol as domain objects, the same on both sides of the wire.

The aggregator's `Federation` returns them, the collaborator's transport rebuilds them from
protobuf (`fedsqueeze/wire.py`), and the in-process simulation passes them straight through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fedsqueeze.codecs import Layout
from fedsqueeze.payload import Payload

TaskKind = Literal["WAIT", "TRAIN", "PREPASS", "DONE", "EVALUATE"]


@dataclass(frozen=True)
class Admission:
    """The answer to Join."""

    collaborator_id: str
    token: str  # the session token every later call carries
    plan_json: str  # the federation plan (canonical JSON)
    plan_sha256: str
    shard_index: int  # which shard of a built-in data set to load
    num_shards: int
    layout: Layout | None = None  # the federation's model: the tensors that travel, in flattening order


@dataclass(frozen=True)
class Task:
    """The answer to GetTask: what to do next."""

    kind: TaskKind  # WAIT: ask again | TRAIN: train on `model`, submit for `round` | PREPASS | DONE: leave | EVALUATE
    round: int = 0
    # the global model, encoded by the downlink chain (PREPASS: or the shared decoder)
    model: Payload | None = None
    message: str = ""  # WAIT/DONE: why; PREPASS: the role (train-autoencoder, train-encoder, shared-decoder)
    # DONE: the federation ran all its rounds (False: it ended early, `message` says why)
    completed: bool = False


@dataclass(frozen=True)
class Evaluation:
    """A collaborator's metrics of a global model on its own held-out data."""

    metrics: Mapping[str, float] = field(default_factory=dict)
    samples: int = 0  # how many held-out samples they are over: the weight of these metrics
