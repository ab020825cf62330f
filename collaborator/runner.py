"""The built-in collaborator: the plan's data set, model and training, on the collaborator API.

`collaborator join` without `--app` runs `builtin_app`: it joins, loads its shard of the plan's
built-in data set (or `--data`), builds the plan's built-in model, and for each round of the
federation (`collaborator/api.py`) trains it with the plan's SGD (`round_step.BuiltinTrainer`) and
submits. It also runs the autoencoder prepass when the plan has one (`prepass.py`).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsqueeze.tasks import GENERATED, Dataset, load_dataset, parse_data_arg, partition

from .api import AppContext, JoinedFederation, Options
from .round_step import BuiltinTrainer
from .transport import Session

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
        shards = partition(
            ds.partition_labels, session.num_shards, plan.task.partition, plan.task.alpha, plan.seed
        )
        idx = shards[session.shard_index % len(shards)]
        desc = f"{name} shard {session.shard_index + 1}/{session.num_shards} ({len(idx)} samples)"
        return LocalData(ds.x_train[idx], ds.y_train[idx], ds.input_shape, ds.num_classes, desc)
    return LocalData(
        ds.x_train, ds.y_train, ds.input_shape, ds.num_classes, f"{name} {path} ({len(ds.y_train)} samples)"
    )


def builtin_app(app: AppContext) -> JoinedFederation:
    """Join, then train the plan's built-in model on the local shard every round."""
    from fedsqueeze.models import build_model

    opts = app.options
    client = opts.client()
    try:
        session = client.join(opts.name or socket.gethostname())  # the plan says which model to build
        plan = session.plan
        local = load_local_data(session, opts.data)
        model = build_model(plan.model.name, local.input_shape, local.num_classes, plan.model.args, plan.seed)
        federation = JoinedFederation(client, session, model, opts)
    except BaseException:
        client.close()
        raise
    app.joined.append(federation)
    log.info("joined as %s: %s", federation.collaborator_id, local.description)
    trainer = BuiltinTrainer(plan, model, local.x, local.y, session.shard_index)
    federation.prepass = _prepass_handler(federation, model, local)
    with federation:
        for rnd in federation:
            if federation.session.shard_index != trainer.shard_index:  # joined again, as a new member
                local = load_local_data(federation.session, opts.data)
                trainer.x, trainer.y, trainer.shard_index = local.x, local.y, federation.session.shard_index
            rnd.submit(trainer.num_samples, trainer.fit(rnd.number))
    return federation


def _prepass_handler(federation: JoinedFederation, model: Any, local: LocalData) -> Any:
    """The autoencoder prepass of the built-in task (PREPASS tasks), if the plan has one."""
    if not federation.plan.prepass.enabled:
        return None
    from .prepass import PrepassContext, handle_task

    session = federation.session
    ctx = PrepassContext(federation.client.upload_decoder, session.collaborator_id, session.shard_index, federation.plan,
                         federation.step, model, local.x, local.y)  # fmt: skip
    return lambda task: handle_task(ctx, task)


def run_collaborator(options: Options, app: Any = None, threads: int | None = None) -> dict[str, Any]:
    """Run `app(AppContext)` (default: the built-in collaborator); the result says whether the federation
    `completed`, and how many rounds this collaborator trained."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)  # several collaborators on one machine (the demo, the tests)
    # torch's first optimizer imports torch._dynamo (seconds): pay for it before joining, not in round 1.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    context = AppContext(options)
    (app or builtin_app)(context)
    if not context.joined:
        raise RuntimeError("the app returned without joining the federation (AppContext.join)")
    federation = context.joined[-1]
    return {"collaborator_id": federation.collaborator_id, "rounds_trained": federation.rounds_trained,
            "completed": bool(federation.completed), "outcome": federation.outcome or "was left before it finished"}  # fmt: skip
