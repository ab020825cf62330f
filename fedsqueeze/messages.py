"""The messages of the federation protocol as domain objects, the same on both sides of the wire.

The aggregator's `Federation` returns them, the collaborator's transport rebuilds them from
protobuf (`fedsqueeze/wire.py`), and the in-process simulation passes them straight through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedsqueeze.payload import Payload

TaskKind = Literal["WAIT", "TRAIN", "PREPASS", "DONE"]


@dataclass(frozen=True)
class Admission:
    """The answer to Join."""

    collaborator_id: str
    token: str  # the session token every later call carries
    plan_json: str  # the federation plan (canonical JSON)
    plan_sha256: str
    shard_index: int  # which shard of a built-in data set to load
    num_shards: int


@dataclass(frozen=True)
class Task:
    """The answer to GetTask: what to do next."""

    kind: TaskKind  # WAIT: ask again | TRAIN: train on `model`, submit for `round` | PREPASS | DONE: leave
    round: int = 0
    model: Payload | None = (
        None  # the global model, encoded by the downlink chain (PREPASS: or the shared decoder)
    )
    message: str = ""  # WAIT/DONE: why; PREPASS: the role (train-autoencoder, train-encoder, shared-decoder)
    completed: bool = (
        False  # DONE: the federation ran all its rounds (False: it ended early, `message` says why)
    )
