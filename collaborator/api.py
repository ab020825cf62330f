"""Federate your own model and training loop: the collaborator API.

    import fedsqueeze

    with fedsqueeze.join("aggregator:50051", model, evaluate=evaluate) as federation:
        for rnd in federation:                    # the global model is loaded into `model`
            loss = train_one_epoch(model, loader, optimizer)   # your code, any device
            rnd.submit(num_samples=len(dataset), metrics={"loss": loss})

- The model is any `torch.nn.Module`. What travels is its parameters, and its floating-point buffers
  when the plan's `model.buffers` is "average" (FedBN's "local" keeps them here); integer buffers
  stay (fedsqueeze/model_state.py). Tensors keep their dtype (fp32, fp16, bf16, fp64) and device:
  the update is moved to the CPU as float32 for the codecs, and the global model back into each
  tensor. At Join the aggregator compares the model with the federation's and refuses one that
  differs, naming the first tensor (name, shape or dtype) that does.
- `evaluate(model) -> (metrics, num_samples)`, optional: your held-out evaluation. It runs on every
  global model this collaborator is sent, before training, and on the final one after the last
  round; the aggregator averages the reports by their sample counts (federated evaluation).
- Codec states (error feedback, residual predictors) live here, per link; a round the aggregator
  hands out again after a restart restores them, so both sides stay in step; an aggregator that no
  longer knows this collaborator is joined again. Progress bar, run report and Prometheus metrics
  as for `collaborator join`.
- `federation.completed` says at the end whether the federation ran all its rounds.

`collaborator join --server HOST:PORT --app module:function` runs `function(app)` with an `AppContext`
whose `join(model, evaluate=...)` is this, with the command line's server, TLS, join token, report
and metrics. The code a collaborator runs is chosen on its own command line: nothing the
aggregator sends (the plan included) can name code to import or call.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import CodecState
from fedsqueeze.errors import Unauthenticated
from fedsqueeze.messages import Evaluation, Task
from fedsqueeze.metrics import Metrics
from fedsqueeze.model_file import ModelError
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan
from fedsqueeze.report import write_json_atomic
from fedsqueeze.tls import ClientTLS

from .round_step import Download, LinkStates, RoundRecord, RoundStep
from .transport import FederationClient, Model, Session

log = logging.getLogger("fedsqueeze.collaborator")

#: Your held-out evaluation of a model: (metrics, how many samples they are over).
Evaluate = Callable[[Any], "tuple[Mapping[str, float], int]"]


@dataclass
class Options:
    """How to reach and join the federation: what `collaborator join` takes on its command line."""

    server: str
    name: str | None = None  # a display name (default: the hostname)
    tls: ClientTLS | None = None
    join_token: str = ""  # the join secret or this collaborator's enrollment token
    connect_timeout: float = 60.0  # give up after this many seconds without the aggregator, before Join
    reconnect_timeout: float = 300.0  # after Join: keep retrying an unreachable aggregator this long
    report_path: Path | None = None  # write what this collaborator sent and received (JSON)
    progress: bool = True  # a progress bar
    metrics: Metrics | None = None  # Prometheus metrics of this process
    data: str | None = None  # `--data`, for an app that reads it
    argv: list[str] = field(default_factory=list)  # `--app-arg` values, for an app

    def client(self) -> FederationClient:
        return FederationClient(self.server, connect_timeout=self.connect_timeout, reconnect_timeout=self.reconnect_timeout,
                                tls=self.tls, join_token=self.join_token)  # fmt: skip


@dataclass
class CollaboratorReport:
    """What this collaborator sent and received, for checking the aggregator's byte counts."""

    path: Path | None
    collaborator_id: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    prepass: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # the final model's download and its evaluation

    def add_round(self, record: dict[str, Any]) -> None:
        # a round trained again replaces its record
        self.rounds = [r for r in self.rounds if r["round"] != record["round"]] + [record]
        self.write()

    def write(self) -> None:
        if self.path is not None:
            data: dict[str, Any] = {"collaborator_id": self.collaborator_id, "rounds": self.rounds}
            if self.prepass:
                data["prepass"] = self.prepass
            if self.evaluation:
                data["evaluation"] = self.evaluation
            write_json_atomic(self.path, data)


def join(
    server: str | Options, model: Any, *, evaluate: Evaluate | None = None, **options: Any
) -> JoinedFederation:
    """Join the federation at `server` with `model` (refused if the model differs from the federation's)."""
    opts = server if isinstance(server, Options) else Options(server=server, **options)
    from fedsqueeze.model_state import buffer_names, layout_of, travelling

    client = opts.client()
    try:
        model_info = Model(
            layout_of(travelling(model, "average")), tuple(buffer_names(model)), evaluate is not None
        )
        session = client.join(opts.name or socket.gethostname(), 0, model_info)
        if session.plan.training.qat:
            log.warning(
                "the plan's training.qat (%r) applies to the built-in training loop; this one is yours: "
                "train through fedsqueeze.qat.WeightQuantizer.of(model, qat_chain(plan.training.qat)) to follow it",
                session.plan.training.qat,
            )
        return JoinedFederation(client, session, model, opts, evaluate=evaluate)
    except BaseException:
        client.close()
        raise


class Round:
    """One round's work, between its global model (loaded into the model) and your `submit`."""

    def __init__(
        self, federation: JoinedFederation, download: Download, evaluation: Evaluation | None
    ) -> None:
        self.federation = federation
        self.number = download.round
        self.evaluation = (
            evaluation  # your evaluation of the global model, before training (None: no evaluate)
        )
        self.record: RoundRecord | None = None
        self.submitted = False
        self._download = download

    @property
    def plan(self) -> Plan:
        return self.federation.plan

    def submit(self, num_samples: int, metrics: Mapping[str, float] | None = None) -> RoundRecord | None:
        """Send the update (the model now minus the global model); None if the aggregator did not take it."""
        if self.submitted:
            raise RuntimeError(f"round {self.number} was submitted already")
        if num_samples < 1:
            raise ValueError("num_samples must be at least 1")
        self.submitted = True
        self.record = self.federation._submit_round(self, num_samples, metrics)
        return self.record


class JoinedFederation:
    """A joined federation, as one collaborator sees it: iterate over its rounds."""

    def __init__(
        self,
        client: FederationClient,
        session: Session,
        model: Any,
        options: Options,
        *,
        evaluate: Evaluate | None = None,
    ) -> None:
        self.client, self.session, self.model, self.options, self.evaluate = (
            client,
            session,
            model,
            options,
            evaluate,
        )
        self.plan = session.plan
        self.chains = LinkChains.from_plan(self.plan)
        self.metrics = options.metrics if options.metrics is not None else Metrics("collaborator")
        self.report = CollaboratorReport(options.report_path, session.collaborator_id)
        self.tensors = self._travelling(session)
        from fedsqueeze.model_state import layout_of, to_vector

        self.layout = layout_of(self.tensors)
        self._initial = to_vector(
            self.tensors
        )  # downlink.prior "initial": the aggregator starts from the same
        self.step = RoundStep(self.plan, self.chains, self.layout, None, self._fresh_states(), self._send,
                              member_id=session.collaborator_id, metrics=self.metrics)  # fmt: skip
        self.prepass: Callable[[Task], dict[str, Any]] | None = (
            None  # the built-in collaborator's autoencoder prepass
        )
        self.completed: bool | None = None  # once done: whether the federation ran all its rounds
        self.outcome = ""
        self.rounds_trained = 0

    @property
    def collaborator_id(self) -> str:
        return self.session.collaborator_id

    def _travelling(self, session: Session) -> dict[str, Any]:
        """The model's travelling tensors in the federation's order; ModelError (after leaving) if they differ."""
        from fedsqueeze.model_state import layout_of, travelling

        tensors = travelling(self.model, self.plan.model.buffers)
        if session.layout is None:
            return tensors
        difference = session.layout.first_difference(layout_of(tensors), ordered=False)
        if difference is not None:
            self.client.leave("model differs")
            raise ModelError(f"this collaborator's model differs from the federation's: {difference}")
        return {t.name: tensors[t.name] for t in session.layout}

    def _fresh_states(self) -> LinkStates:
        return LinkStates(up=CodecState(), down=self.chains.downlink_state(self._initial))

    def _send(
        self,
        round_number: int,
        num_samples: int,
        payload: Payload,
        metrics: dict[str, float],
        evaluation: Evaluation | None,
    ) -> int:
        return self.client.submit_update(round_number, num_samples, payload, metrics, evaluation)

    # -- the rounds --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Round]:
        from tqdm import tqdm

        from fedsqueeze.model_state import load_vector

        bar = tqdm(
            total=self.plan.rounds,
            desc=self.collaborator_id,
            unit="round",
            disable=not self.options.progress,
            leave=False,
        )
        try:
            while True:
                try:
                    task = self.client.get_task(wait_s=10.0)
                except Unauthenticated as exc:
                    log.warning(
                        "the aggregator does not know %s any more (%s): joining again",
                        self.collaborator_id,
                        exc,
                    )
                    self._rejoin()
                    continue
                if task.kind == "DONE":
                    self.completed, self.outcome = task.completed, task.message
                    return
                if task.kind == "PREPASS":
                    if self.prepass is None:
                        raise ModelError(
                            "the plan's uplink has an `ae` stage, whose prepass only `collaborator join` (the built-in task) runs"
                        )
                    self.report.prepass = self.prepass(task)
                    self.report.write()
                elif task.kind == "EVALUATE" and task.model is not None:
                    self._evaluate_final(task)
                elif task.kind == "TRAIN" and task.model is not None:
                    download = self.step.begin(task)
                    load_vector(self.tensors, download.weights, self.model)
                    rnd = Round(self, download, self._evaluation())
                    t0 = time.perf_counter()
                    yield rnd
                    if not rnd.submitted:
                        log.warning("round %d: the app did not submit an update", rnd.number)
                    elif rnd.record is not None:
                        self.metrics.record_training(
                            rnd.number, time.perf_counter() - t0, rnd.record.train_metrics.get("loss")
                        )
                        self.rounds_trained += 1
                        bar.update(rnd.number - bar.n)
                        loss = rnd.record.train_metrics.get("loss")
                        ratio = rnd.record.encode_stats.ratio if rnd.record.encode_stats else 0.0
                        bar.set_postfix(loss="-" if loss is None else f"{loss:.3f}", up=f"{ratio:.0f}x")
        finally:
            bar.close()

    def _submit_round(
        self, rnd: Round, num_samples: int, metrics: Mapping[str, float] | None
    ) -> RoundRecord | None:
        from fedsqueeze.model_state import to_vector

        record = self.step.finish(
            rnd._download, to_vector(self.tensors), num_samples, metrics, rnd.evaluation
        )
        if record is not None:
            self.report.add_round(record.to_json())
        return record

    def _evaluation(self) -> Evaluation | None:
        if self.evaluate is None:
            return None
        metrics, samples = self.evaluate(self.model)
        return Evaluation({str(k): float(v) for k, v in metrics.items()}, int(samples))

    def _evaluate_final(self, task: Task) -> None:
        from fedsqueeze.model_state import load_vector

        assert task.model is not None
        load_vector(self.tensors, self.step.decode_download(task.model), self.model)
        evaluation = self._evaluation()
        if evaluation is None or evaluation.samples < 1:
            return
        self.client.submit_evaluation(task.round, evaluation)
        self.report.evaluation = {"round": task.round, "down_raw": self.layout.raw_bytes, "down_wire": task.model.wire_size,
                                  **{f"eval_{k}": v for k, v in evaluation.metrics.items()}}  # fmt: skip
        self.report.write()

    def _rejoin(self) -> None:
        self.session = self.client.rejoin()
        self.report.collaborator_id = self.session.collaborator_id
        self.step.states = self._fresh_states()
        self.step.member_id = self.session.collaborator_id

    # -- the end -----------------------------------------------------------------------------------
    def close(self) -> None:
        self.client.leave("done")
        self.report.write()
        self.client.close()

    def __enter__(self) -> JoinedFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class AppContext:
    """What `collaborator join --app module:function` passes to `function`: the command line's options."""

    options: Options
    joined: list[JoinedFederation] = field(default_factory=list)

    @property
    def data(self) -> str | None:
        return self.options.data

    @property
    def argv(self) -> list[str]:
        return self.options.argv

    def join(self, model: Any, *, evaluate: Evaluate | None = None) -> JoinedFederation:
        federation = join(self.options, model, evaluate=evaluate)
        self.joined.append(federation)
        return federation
