"""The aggregator's domain logic, composed of parts that each own one thing. No protobuf, no gRPC here.

- `membership.py`: who is in (ids, tokens, shards, active or lost);
- `rounds.py`: round control (selection, quorum, retries, deadlines, which updates a round accepts);
- `links.py`: each member's codec states; encodes downloads and decodes uploads;
- `prepass.py`: the autoencoder prepass's tasks and decoder uploads;
- `strategy.py`, `server_optimizer.py`, `global_update.py`: how accepted updates move the global model;
- `evaluation.py`: the model's layout and initial weights, and the held-out evaluation;
- `checkpoint.py`: the checkpoint schema; the run report is `fedsqueeze/report.py`.

Threads: gRPC handler threads call `join`, `get_task`, `submit_update`, `upload_decoder` and
`leave`; one round thread runs `run`. Membership and round state are guarded by one condition
variable (`_cond`), held only for bookkeeping. Encoding a download and decoding an upload, the
expensive parts, run outside it under that member's link lock (so a member's codec states see its
messages in order), into a fork of the state that is committed under `_cond` once the round still
wants it. Lock order: a link lock may be held while `_cond` is taken, never the reverse.

Reliability: see `rounds.py` (deadlines, quorum, retries, idempotent updates). A selected member
that misses the deadline is marked lost and not selected again until it calls in. With a state
directory, the federation checkpoints after every round and resumes from it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import CodecError, CodecState, Layout
from fedsqueeze.errors import FailedPrecondition, FederationError, InvalidArgument, ResourceExhausted
from fedsqueeze.messages import Admission, Evaluation, Task
from fedsqueeze.metrics import Metrics
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan
from fedsqueeze.report import RoundRecord, RunReport

from . import checkpoint
from .admission import JoinPolicy
from .evaluation import Evaluator, FederatedEvaluation, HeldOutEvaluator, InitialModel
from .global_update import GlobalUpdate
from .links import Links
from .membership import Member, Membership
from .prepass import SHARED_DECODER, Prepass, PrepassTask
from .rounds import RoundControl, RoundState
from .server_optimizer import ServerOptimizer, ServerOptimizerError
from .strategy import Strategy, build_strategy

log = logging.getLogger("fedsqueeze.aggregator")

MAX_POLL_S = 60.0  # the longest a GetTask long poll is held
MAX_SAMPLES = 10**9
MAX_RESENDS = 8  # a member may ask for a round's download again this often (a lost response), no more
RECENT_NORMS = 64  # update norms remembered across rounds, the reference of a round's norm bound when alone
# after a restart, how long the rounds wait for every resumed member once quorum is back
RESUME_GRACE_S = 30.0


class Federation:
    def __init__(
        self,
        plan: Plan,
        *,
        model: InitialModel | None = None,
        evaluator: Evaluator | None = None,
        report_path: Any = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        metrics: Metrics | None = None,
        state_dir: str | Path | None = None,
        join_policy: JoinPolicy | None = None,
    ) -> None:
        """`model`: the layout and initial weights; None builds the plan's built-in model, which then
        also evaluates the global model on the data set's held-out split (unless `evaluator` is given).
        `evaluator`: the aggregator's own evaluation of each global model; without one (a model of the
        collaborators' own and no `--evaluate`), the collaborators' federated evaluation is the measure."""
        self.plan = plan
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.join_policy = join_policy or JoinPolicy()
        # built-in data sets: each shard's size, the cap of its member's weight
        self.shard_sizes: list[int] | None = None
        if model is None:
            held_out = HeldOutEvaluator(plan)
            model, evaluator = held_out.initial, evaluator or held_out
            self.shard_sizes = held_out.shard_sizes
        self.evaluate: Evaluator | None = evaluator
        self.federated = FederatedEvaluation()
        self.layout = model.layout
        self.global_model = np.asarray(model.weights, dtype=np.float32).copy()
        self.chains = LinkChains.from_plan(plan)
        self.up_chain, self.down_chain = self.chains.uplink, self.chains.downlink
        self.metrics = metrics if metrics is not None else Metrics("aggregator")
        self.links = Links(self.chains, self.layout, self.global_model, self.metrics)
        self.up_fingerprint, self.down_fingerprint = self.links.up_fingerprint, self.links.down_fingerprint
        self.server_optimizer = ServerOptimizer(plan.aggregation.server_optimizer)
        self.global_update = GlobalUpdate(self.chains.global_update)
        self.prepass = Prepass(plan.prepass, self.chains.uplink, self.layout)
        # An encoded update is never legitimately much larger than the raw model.
        self.max_update_bytes = 2 * self.layout.raw_bytes + (1 << 20)
        self.max_decoder_bytes = self.prepass.max_bytes  # 0 without an autoencoder
        self.max_poll_s = MAX_POLL_S
        self.on_round = on_round

        self._cond = threading.Condition()
        self._task_watchers: list[Callable[[], None]] = []
        self.membership = Membership(plan.num_shards, plan.max_members)
        self.rounds = RoundControl(plan, self._cond, self.membership.active_ids, self._announce)
        self._phase = "waiting"  # waiting | prepass | training | done
        self._outcome = ""  # once done: "completed", or why the federation ended early
        self._resumed_members = 0  # active members restored from a checkpoint
        self._recent_norms: deque[float] = deque(maxlen=RECENT_NORMS)
        self._resends: dict[str, int] = {}  # this round: re-sent downloads per member
        self.metrics.track_active(self._active_count)
        self.report = RunReport(
            path=report_path,
            header={
                "plan": plan.to_json(),
                "plan_sha256": plan.sha256,
                "model": {
                    "name": plan.model.name,
                    "parameters": self.layout.numel,
                    "raw_bytes": self.layout.raw_bytes,
                },
                "uplink_chain": str(self.up_chain),
                "downlink_chain": str(self.down_chain),
                "downlink_update_chain": None
                if self.global_update.chain is None
                else str(self.global_update.chain),
                "downlink_prior": plan.downlink.prior,
                "server_optimizer": dataclasses.asdict(plan.aggregation.server_optimizer),
            },
        )
        self.resumed_from: int | None = None
        if self.state_dir is not None:
            self._restore()

    # -- membership -------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self._phase

    def active_ids(self) -> set[str]:
        """Joined, not left, and not lost."""
        return self.membership.active_ids()

    def _active_count(self) -> int:
        with self._cond:
            return self.membership.active_count()

    def watch_tasks(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread, under the federation's lock: it must not block) whenever a
        member may have a new task: a round opens or widens, the phase changes, a shared decoder arrives."""
        self._task_watchers.append(callback)

    def _announce(self) -> None:
        """Under _cond: wake the threads waiting on it, and the watchers."""
        self._cond.notify_all()
        for callback in self._task_watchers:
            callback()

    def join(
        self,
        name: str,
        num_samples: int,
        identity: str | None = None,
        join_token: str = "",
        layout: Layout | None = None,
        buffers: Sequence[str] = (),
        evaluates: bool = False,
    ) -> Admission:
        """Register a collaborator, if the join policy admits it and its model (`layout`, all its floating-point
        tensors, of which `buffers` are buffers) is the federation's. Its id is `identity` (the client
        certificate's common name under mTLS) or its enrollment token's; joining again under a known
        identity re-issues its session token and resets its codec states (the collaborator restarted),
        keeping its shard and an installed autoencoder decoder."""
        enrolled = self.join_policy.admit(join_token)
        identity = identity if identity is not None else enrolled
        if layout is not None:
            self.check_model(layout, buffers)
        with self._cond:
            if self._phase == "done":
                raise FailedPrecondition("the federation has finished")
            member, rejoined = self.membership.join(name, num_samples, identity)
            member.evaluates = evaluates
            if not rejoined:
                self.links.add(member.id)
        if rejoined:
            if self.links.has(member.id):
                self.links.reset(member.id, keep_stage=self.prepass.index)
            else:  # it had left: its states were freed
                self.links.add(member.id)
            log.info("re-joined: %s", member.id)
        else:
            log.info("joined: %s (%s), shard %d", member.id, member.name, member.shard_index)
        with self._cond:
            self._announce()
        return Admission(
            member.id,
            member.token,
            self.plan.canonical(),
            self.plan.sha256,
            member.shard_index,
            self.plan.num_shards,
            self.layout,
        )

    def check_model(self, layout: Layout, buffers: Sequence[str] = ()) -> None:
        """Refuse (InvalidArgument) a collaborator's model whose travelling tensors are not the federation's."""
        skipped = set(buffers) if self.plan.model.buffers == "local" else set()
        travelling = Layout(tuple(t for t in layout if t.name not in skipped))
        difference = self.layout.first_difference(travelling, ordered=False)
        if difference is not None:
            raise InvalidArgument(f"the collaborator's model differs from the federation's: {difference}")

    def authenticate(self, member_id: str, token: str) -> Member:
        """The caller, if the token is its own; a lost member that calls in is back."""
        member = self.membership.authenticate(member_id, token)
        if member.lost:
            with self._cond:
                if member.lost:
                    member.lost = False
                    log.info("back: %s", member.id)
                    self._cond.notify_all()
        return member

    def leave(self, member_id: str, token: str) -> None:
        """A member leaves: it is not selected again, and its codec states are freed."""
        member = self.authenticate(member_id, token)
        with self._cond:
            member.active = False
            self._cond.notify_all()
        self.links.remove(member.id)
        log.info("left: %s", member.id)

    # -- downloads ------------------------------------------------------------------------------
    def get_task(self, member_id: str, token: str, wait_s: float) -> Task:
        """The member's next task; waits up to `wait_s` (at most MAX_POLL_S) for one."""
        member = self.authenticate(member_id, token)
        deadline = time.monotonic() + max(0.0, min(wait_s, MAX_POLL_S))
        while True:
            with self._cond:
                while True:
                    if self._phase == "done":
                        return Task(
                            "DONE",
                            message=self._outcome or "the federation has finished",
                            completed=self._outcome == "completed",
                        )
                    if self._phase == "evaluating" and self._wants_evaluation(member):
                        model = self.global_model
                        break
                    pre = self.prepass.task_for(member.id, training=self._phase == "training")
                    rnd = self.rounds.current
                    if pre is not None or (
                        rnd is not None and self._phase == "training" and rnd.wants_update_from(member.id)
                    ):
                        model = self.global_model
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return Task("WAIT", message=f"waiting ({self._phase})")
                    self._cond.wait(remaining)
            if self._phase == "evaluating":
                return self._evaluation_task(member, model)
            if pre is not None:
                return self._prepass_task(member, pre, model)
            assert rnd is not None
            task = self._train_task(member, rnd, model)
            if task is not None:
                return task  # else the round closed while its download was encoded: look again

    def _wants_evaluation(self, member: Member) -> bool:
        final = self.plan.rounds + 1
        return member.evaluates and member.id not in self.federated.evaluated.get(final - 1, set())

    def _evaluation_task(self, member: Member, model: np.ndarray) -> Task:
        """The final global model, for a member that evaluates it (once: a re-send is the same bytes)."""
        final = self.plan.rounds + 1
        link = self.links.link(member.id)
        with link.lock:
            download = self.links.encode_download(member.id, final, model)
            download.commit()
        if download.fresh:
            with self._cond:
                self.report.evaluation_bytes["down_raw"] += self.layout.raw_bytes
                self.report.evaluation_bytes["down_wire"] += download.payload.wire_size
            self.metrics.record_transfer(
                "down",
                self.links.down_codec,
                member.id,
                raw=self.layout.raw_bytes,
                wire=download.payload.wire_size,
            )
        return Task("EVALUATE", round=final, model=download.payload)

    def _train_task(self, member: Member, rnd: RoundState, model: np.ndarray) -> Task | None:
        link = self.links.link(member.id)
        with link.lock:
            download = self.links.encode_download(member.id, rnd.number, model)
            with self._cond:
                if self.rounds.current is not rnd or not rnd.wants_update_from(member.id):
                    return None
                wire = download.payload.wire_size
                if download.fresh:
                    download.commit()
                    rnd.bytes["down_raw"] += self.layout.raw_bytes
                    rnd.bytes["down_wire"] += wire
                else:  # it has this round's download already (a lost response): counted apart, and only so often
                    resends = self._resends.get(member.id, 0)
                    if resends >= MAX_RESENDS:
                        raise ResourceExhausted(
                            f"{member.id} asked for round {rnd.number}'s download {MAX_RESENDS + 1} times"
                        )
                    self._resends[member.id] = resends + 1
                    rnd.resent["messages"] += 1
                    rnd.resent["wire"] += wire
        if download.fresh:
            self.metrics.record_transfer(
                "down", self.links.down_codec, member.id, raw=self.layout.raw_bytes, wire=wire
            )
        else:
            self.metrics.record_resent("down", self.links.down_codec, member.id, wire)
        return Task("TRAIN", round=rnd.number, model=download.payload)

    def _prepass_task(self, member: Member, pre: PrepassTask, model: np.ndarray) -> Task:
        if pre.role == SHARED_DECODER:
            assert pre.decoder is not None and pre.tensors is not None
            self.links.install(member.id, self.prepass.index, pre.tensors)
            raw, payload = len(pre.decoder.data), pre.decoder
        else:
            link = self.links.link(member.id)
            with link.lock:
                download = self.links.encode_download(member.id, 0, model)
                download.commit()
            raw, payload = self.layout.raw_bytes, download.payload
        with self._cond:
            self.report.prepass_bytes["down_raw"] += raw
            self.report.prepass_bytes["down_wire"] += payload.wire_size
        return Task("PREPASS", round=0, model=payload, message=pre.role)

    # -- uploads ----------------------------------------------------------------------------------
    def check_update(
        self, member_id: str, token: str, round_number: int, num_samples: int, size: int
    ) -> None:
        """Refuse an update from its header alone, before its bytes are read."""
        member = self.authenticate(member_id, token)
        if not 1 <= num_samples <= MAX_SAMPLES:
            raise InvalidArgument(f"num_samples must be in [1, {MAX_SAMPLES:.0e}], got {num_samples}")
        if not 0 <= size <= self.max_update_bytes:
            raise InvalidArgument(f"declared size {size} bytes is outside [0, {self.max_update_bytes}]")
        with self._cond:
            self.rounds.check_upload(member, round_number, self._phase)

    def submit_update(
        self,
        member_id: str,
        token: str,
        round_number: int,
        num_samples: int,
        payload: Payload,
        wire_size: int,
        metrics: Mapping[str, float] | None = None,
        evaluation: Evaluation | None = None,
    ) -> int:
        """Decode one update and fold it into its round; returns its wire size. `metrics`: its training's;
        `evaluation`: its evaluation of the global model it was sent for this round (before training)."""
        member = self.authenticate(member_id, token)
        if not 1 <= num_samples <= MAX_SAMPLES:
            raise InvalidArgument(f"num_samples must be in [1, {MAX_SAMPLES:.0e}], got {num_samples}")
        if wire_size > self.max_update_bytes:
            raise InvalidArgument(f"update of {wire_size} bytes exceeds the limit of {self.max_update_bytes}")
        with self._cond:
            rnd = self.rounds.check_upload(member, round_number, self._phase)
            rnd.receiving.add(member.id)
        try:
            with self.links.link(member.id).lock:
                upload = self.links.decode_upload(member.id, payload)
                with self._cond:
                    if self.rounds.current is not rnd:
                        raise FailedPrecondition(
                            f"round {round_number} closed while the update was being decoded"
                        )
                    rnd.strategy.accumulate(upload.update, self._weight(member, num_samples))
                    upload.commit()
                    rnd.submitted.add(member.id)
                    member.last_round = round_number
                    member.num_samples = num_samples
                    rnd.bytes["up_raw"] += self.layout.raw_bytes
                    rnd.bytes["up_wire"] += wire_size
                    rnd.train.add(metrics or {}, float(num_samples))
                    if evaluation is not None and evaluation.samples > 0:
                        self.federated.add(
                            round_number - 1, member.id, evaluation.metrics, evaluation.samples
                        )
        finally:
            with self._cond:
                rnd.receiving.discard(member.id)
                self._cond.notify_all()
        self.metrics.record_transfer(
            "up", self.links.up_codec, member.id, raw=self.layout.raw_bytes, wire=wire_size
        )
        log.debug("update from %s for round %d: %d bytes", member.id, round_number, wire_size)
        return wire_size

    def check_decoder(self, member_id: str, token: str, architecture: dict[str, Any], size: int) -> None:
        """Refuse a decoder upload from its header alone, before its bytes are read."""
        member = self.authenticate(member_id, token)
        with self._cond:
            self.prepass.check_upload(member.id, architecture)
        if not 0 <= size <= self.max_decoder_bytes:
            raise InvalidArgument(f"declared size {size} bytes is outside [0, {self.max_decoder_bytes}]")

    def upload_decoder(self, member_id: str, token: str, architecture: dict[str, Any], blob: bytes) -> int:
        """Validate, bind and install a member's autoencoder decoder; returns its size."""
        self.check_decoder(member_id, token, architecture, len(blob))
        member = self.membership.authenticate(member_id, token)
        tensors = self.prepass.validate(member.id, blob)
        with self._cond:
            self.prepass.check_upload(member.id, architecture)  # again: another upload may have won meanwhile
            self.prepass.accepted(member.id, tensors, blob)
            if "prepass" in self.report.extra:  # a re-upload after the prepass: the report counts it too
                self.report.extra["prepass"]["decoders"] = dict(self.prepass.installed)
            if self.prepass.shared:
                self._announce()  # the others' PREPASS task with the shared decoder
            # a re-upload between two rounds counts in the round just closed (its record shares the dict)
            rnd = self.rounds.current or self.rounds.last
            target = (
                rnd.bytes if (rnd is not None and not self.prepass.running) else self.report.prepass_bytes
            )
            target["decoder"] += len(blob)
            member.decoder_bytes += len(blob)
            count = self.prepass.installed[member.id]
        # kept before it is used: a restart must decode with the AE the member keeps
        if self.state_dir is not None:
            checkpoint.save_decoder(self.state_dir, member.id, count, blob)
        self.links.install(member.id, self.prepass.index, tensors)
        self.metrics.record_decoder(self.links.up_codec, member.id, len(blob))
        with self._cond:
            self._cond.notify_all()
        log.info("decoder from %s accepted (%d bytes)", member.id, len(blob))
        return len(blob)

    def submit_evaluation(
        self, member_id: str, token: str, round_number: int, evaluation: Evaluation
    ) -> None:
        """A member's evaluation of the final global model (the EVALUATE task of `round_number`)."""
        member = self.authenticate(member_id, token)
        final = self.plan.rounds + 1
        if round_number != final:
            raise FailedPrecondition(f"the final evaluation is round {final}, not {round_number}")
        if evaluation.samples < 1:
            raise InvalidArgument("an evaluation needs num_samples >= 1")
        with self._cond:
            if self._phase != "evaluating":
                raise FailedPrecondition(f"no evaluation is open (phase: {self._phase})")
            self.federated.add(final - 1, member.id, evaluation.metrics, evaluation.samples)
            self._cond.notify_all()

    # -- the round loop ---------------------------------------------------------------------------
    def _weight(self, member: Member, num_samples: int) -> float:
        """A member's FedAvg weight: its declared sample count, capped (plan `aggregation`), or 1."""
        a = self.plan.aggregation
        if a.weighting == "equal":
            return 1.0
        weight = num_samples if a.max_samples is None else min(num_samples, a.max_samples)
        if self.shard_sizes is not None:  # the aggregator assigned this member's shard: it knows its size
            weight = min(weight, max(1, self.shard_sizes[member.shard_index % len(self.shard_sizes)]))
        return float(weight)

    def run(self, stop: threading.Event) -> None:
        """The round loop, until every round has run (then DONE, completed) or `stop` is set. A stop is not
        the end of the federation: nobody is told DONE, and a restart on the same state dir resumes it."""
        try:
            self._run(stop)
        except BaseException as exc:
            self.shutdown(f"ended early: {exc}")
            raise
        if self.rounds.completed >= self.plan.rounds:
            self._final_evaluation(stop)
            if not stop.is_set():
                self.shutdown("completed")
        self.report.write()

    def _run(self, stop: threading.Event) -> None:
        self._wait_for_members(stop)
        if not self.prepass.done:
            self._run_prepass(stop)
        if self.resumed_from is None:
            self.report.extra["initial_accuracy"] = self._server_scores().get("accuracy")
            self.checkpoint()
            self.report.write()
        for number in range(self.rounds.completed + 1, self.plan.rounds + 1):
            if stop.is_set():
                break
            record = self._run_round(number, stop)
            if stop.is_set():
                break  # interrupted, not finished: not recorded; a restart on the state dir re-runs it
            self.report.rounds.append(record)
            self.rounds.completed = number
            self._federated_results(number - 1)
            self.checkpoint()  # before the next round opens: a restart resumes at number + 1
            self.report.write()
            if self.evaluate is not None or not self._federated_in_use():
                self._publish(record)  # else once the collaborators have evaluated its model (next round)

    def _server_scores(self) -> dict[str, float]:
        return self.evaluate(self.global_model) if self.evaluate is not None else {}

    def _federated_in_use(self) -> bool:
        return any(m.evaluates for m in self.membership.members.values())

    def _publish(self, record: RoundRecord) -> None:
        """A finished round record to Prometheus and the console (`on_round`)."""
        self.metrics.record_round(record, self.report.summary())
        if self.on_round is not None:
            self.on_round(record)

    def _federated_results(self, model_round: int) -> None:
        """Write the collaborators' evaluation of the model after `model_round` into its record (0: the initial model)."""
        result = self.federated.result(model_round)
        if not result:
            return
        self.metrics.record_evaluation(result)
        if model_round == 0:
            self.report.extra["initial_evaluation"] = result
            return
        record = next((r for r in self.report.rounds if r.round == model_round), None)
        if record is None:
            return
        record.evaluation = result
        if self.evaluate is None:
            record.accuracy, record.loss = result.get("accuracy"), result.get("loss")
            self._publish(record)

    def _final_evaluation(self, stop: threading.Event) -> None:
        """After the last round: the members that evaluate score the final model (EVALUATE tasks), until
        all have or the round deadline passes."""
        last = self.plan.rounds
        if self._federated_in_use():
            with self._cond:
                self._phase = "evaluating"
                self._announce()
                deadline = time.monotonic() + self.plan.round_timeout_s
                while not stop.is_set() and time.monotonic() < deadline:
                    waiting = [
                        m
                        for m in self.membership.members.values()
                        if m.active and not m.lost and self._wants_evaluation(m)
                    ]
                    if not waiting:
                        break
                    self._cond.wait(0.25)
            self._federated_results(last)
        record = next((r for r in self.report.rounds if r.round == last), None)
        if (
            record is not None
            and self.evaluate is None
            and self._federated_in_use()
            and not record.evaluation
        ):
            self._publish(record)  # nobody evaluated it in time: published without scores

    def _wait_for_members(self, stop: threading.Event) -> None:
        """Before the first round, `collaborators.min` members. After a restart, the members that were
        active, called in again; once enough are back for a round (quorum, min_per_round), at most
        RESUME_GRACE_S more for the others, which can return later (they are lost until they do)."""
        c = self.plan.collaborators
        start = time.monotonic()
        deadline = start + c.join_timeout_s
        if self.resumed_from is None:
            need_all = need = c.min
        else:
            need_all = max(1, self._resumed_members)
            need = min(need_all, max(self.plan.quorum, c.min_per_round))
        with self._cond:
            while (count := self.membership.active_count()) < need_all:
                if stop.is_set():
                    return
                now = time.monotonic()
                if (
                    count >= need
                    and self.resumed_from is not None
                    and now > start + min(RESUME_GRACE_S, c.join_timeout_s)
                ):
                    log.warning(
                        "resuming with %d of the %d members that were active; the others can return later",
                        count,
                        need_all,
                    )
                    return
                if now > deadline:
                    if count >= need and self.resumed_from is not None:
                        return
                    raise FederationError(
                        f"only {count} of {need} collaborators joined within the join timeout"
                    )
                self._cond.wait(0.5)

    def _run_prepass(self, stop: threading.Event) -> None:
        """Hold the rounds until every active member has its decoder installed (or time runs out)."""
        if not self.prepass.enabled:
            self.prepass.done = True
            return
        timeout = max(self.plan.round_timeout_s, 60.0) * 2
        with self._cond:
            self.prepass.begin(self.active_ids())
            self._phase = "prepass"
            self._announce()
            deadline = time.monotonic() + timeout
            while not stop.is_set() and time.monotonic() < deadline:
                active = self.active_ids()
                if active and all(self.prepass.ready(m) for m in active):
                    break
                self._cond.wait(0.25)
            summary = self.prepass.end(self.active_ids())
        self.report.extra["prepass"] = summary
        self.report.write()
        if not self.prepass.installed and not stop.is_set():
            raise FederationError("prepass: no decoder was uploaded before the timeout")
        if summary["missing"]:
            log.warning("prepass ended without a decoder for %s", summary["missing"])

    def _new_strategy(self) -> Strategy:
        a = self.plan.aggregation
        return build_strategy(
            self.plan.uplink.target,
            a.clip_norm,
            a.robust,
            a.trim_fraction,
            a.norm_bound,
            list(self._recent_norms),
        )

    def _run_round(self, number: int, stop: threading.Event) -> RoundRecord:
        quorum = self.plan.quorum
        with self._cond:
            strategy = self._new_strategy()
            strategy.begin(self.global_model)
            self._phase = "training"
            self._resends = {}
            rnd = self.rounds.open(number, strategy)
            closed = self.rounds.run(rnd, stop)
            for mid in closed.missing:  # selected, alive or not, and silent until the deadline
                member = self.membership.members.get(mid)
                if member is not None and member.active and not stop.is_set():
                    member.lost = True
            count = strategy.count
        self._recent_norms.extend(getattr(strategy, "norms", []))
        if count >= quorum:
            status = "ok" if rnd.attempt == 0 else "retried"
            proposed = self.server_optimizer.apply(self.global_model, strategy.finish())
            self.global_model = self.global_update.apply(self.global_model, proposed, self.layout)
            if self.global_update.last_stats is not None:
                self.metrics.record_encode(
                    "global", str(self.global_update.chain), self.global_update.last_stats
                )
        else:
            status = f"failed: quorum not met ({count} of {quorum} updates) after {rnd.attempt} retries; the global model is unchanged"
            log.warning("round %d %s", number, status)
        scores = self._server_scores()
        return RoundRecord(
            round=number,
            accuracy=scores.get("accuracy"),
            loss=scores.get("loss"),
            participants=count,
            dropped=len(closed.missing),
            seconds=time.monotonic() - rnd.started,
            bytes=rnd.bytes,  # shared: a decoder re-uploaded after the round closed still counts in it
            status=status,
            attempts=rnd.attempt + 1,
            resent=dict(rnd.resent),
            aggregation=strategy.summary(),
            train=rnd.train.result(),
        )

    def wait_for_change(self, timeout: float) -> None:
        """Block until the federation's state changes (a round opens, a member joins, ...) or `timeout`."""
        with self._cond:
            self._cond.wait(timeout)

    def shutdown(self, outcome: str) -> None:
        """End the federation: every poll gets DONE, saying whether it `completed` (the first outcome stays)."""
        with self._cond:
            self._phase = "done"
            self._outcome = self._outcome or outcome
            self.rounds.current = None
            self._announce()

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self) -> Path | None:
        """Write the state directory's checkpoint (atomic); between rounds, from the round thread."""
        if self.state_dir is None:
            return None
        with self._cond:
            membership = self.membership.to_json()
            prepass = self.prepass.to_json()
            report = {"rounds": [r.to_json() for r in self.report.rounds], "extra": dict(self.report.extra),
                      "prepass_bytes": dict(self.report.prepass_bytes)}  # fmt: skip
            model = self.global_model.copy()
            ids = list(self.membership.members)
        states = self.links.states(ids)  # link locks, never under _cond; those that left have none
        ckpt = checkpoint.Checkpoint(round=self.rounds.completed, plan_sha256=self.plan.sha256, global_model=model, states=states,
                                     membership=membership, prepass=prepass, report=report,
                                     server_state=self.global_update.state.to_bytes(),
                                     optimizer_state=self.server_optimizer.state_bytes())  # fmt: skip
        path = checkpoint.save(self.state_dir, ckpt, self.layout)
        log.info("checkpoint after round %d: %s", self.rounds.completed, path)
        return path

    def _restore_decoders(self) -> None:
        """Re-install the decoders uploaded after the checkpoint was written (checked again), counting
        their bytes in the last round it holds (or the prepass)."""
        assert self.state_dir is not None
        for mid, uploads in checkpoint.decoders_since(self.state_dir, self.prepass.installed).items():
            member = self.membership.members.get(mid)
            if member is None or not self.links.has(mid):
                continue
            latest, path = uploads[-1]
            blob = path.read_bytes()
            try:
                tensors = self.prepass.validate(mid, blob)
            except InvalidArgument as exc:
                raise checkpoint.CheckpointError(f"{self.state_dir}: a kept decoder of {mid}: {exc}") from exc
            self.prepass.accepted(mid, tensors, blob)
            self.prepass.installed[mid] = latest  # every upload since the checkpoint, not just this one
            self.links.install(mid, self.prepass.index, tensors)
            size = sum(p.stat().st_size for _, p in uploads)
            target = self.report.rounds[-1].bytes if self.report.rounds else self.report.prepass_bytes
            target["decoder"] = target.get("decoder", 0) + size
            member.decoder_bytes += size
            if "prepass" in self.report.extra:
                self.report.extra["prepass"]["decoders"] = dict(self.prepass.installed)
            log.info("re-installed %s's decoder upload %d (after the checkpoint)", mid, latest)

    def _restore(self) -> None:
        assert self.state_dir is not None
        ckpt = checkpoint.load(self.state_dir, self.plan.sha256, self.layout)
        if ckpt is None:
            return
        try:
            self.global_model = ckpt.global_model.astype(np.float32)
            self.global_update.state = (
                CodecState.from_bytes(ckpt.server_state) if ckpt.server_state else CodecState()
            )
            self.server_optimizer.load_state(ckpt.optimizer_state, self.layout.numel)
            self.membership.restore(ckpt.membership)
            self.links.restore(
                {mid: ckpt.states[mid] for mid in self.membership.members if mid in ckpt.states}
            )
            self.prepass.restore(ckpt.prepass)
            rep = ckpt.report
            self.report.rounds = [RoundRecord(**r) for r in rep.get("rounds", [])]
            self.report.extra.update(rep.get("extra", {}))
            self.report.prepass_bytes.update(rep.get("prepass_bytes", {}))
            self._restore_decoders()
        except (KeyError, TypeError, ValueError, CodecError, ServerOptimizerError) as exc:
            raise checkpoint.CheckpointError(f"{self.state_dir}: malformed checkpoint: {exc}") from exc
        self._resumed_members = sum(1 for m in self.membership.members.values() if m.active)
        self.rounds.completed = ckpt.round
        self.resumed_from = ckpt.round
        self.report.extra["resumed_after_round"] = self.report.extra.get("resumed_after_round", []) + [
            ckpt.round
        ]
        log.info(
            "resumed from %s after round %d (%d members)",
            self.state_dir,
            ckpt.round,
            len(self.membership.members),
        )
