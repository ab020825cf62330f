"""The aggregator's domain logic: membership, rounds, decoding and aggregation. No protobuf here.

Threads: gRPC handler threads call `join`, `get_task`, `submit_update`, `upload_decoder` and
`leave`; one round thread runs `run`. Shared state is guarded by one condition variable;
decoding, the expensive part, runs outside it, serialised per collaborator because each
collaborator's uplink CodecState must see its messages in order.

Reliability: every round has a deadline (`round_timeout_s`) and a quorum (`quorum` accepted
updates); a round that misses quorum is re-opened up to `round_retries` times, keeping the updates
it has, then fails explicitly (the round record's `status`). A selected collaborator that misses
the deadline is marked lost and not selected again until it calls in. Updates are identified by
(collaborator, round): a repeat of an accepted update gets ALREADY_EXISTS, an update for a closed
or future round FAILED_PRECONDITION. A refused update leaves the collaborator's uplink CodecState
untouched (stateful chains decode into a copy, committed on acceptance). With a state directory,
the federation checkpoints after every round (aggregator/checkpoint.py) and resumes from it.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
    Unavailable,
)
from fedsqueeze.metrics import Metrics
from fedsqueeze.models import build_model, get_flat, model_layout, set_flat
from fedsqueeze.plan import Plan
from fedsqueeze.report import RoundRecord, RunReport
from fedsqueeze.training import evaluate
from fedsqueeze.wire import WirePayload, payload_from_bytes, payload_wire_size

from . import checkpoint
from .decoders import Prepass
from .global_update import GlobalUpdate
from .server_optimizer import ServerOptimizer, ServerOptimizerError
from .strategy import Strategy, build_strategy

log = logging.getLogger("fedsqueeze.aggregator")

MAX_NAME_LEN = 128
IDENTITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


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
    lost: bool = False  # missed a deadline (or not back since a restart): not selected until it calls in
    last_round: int = 0  # the last round whose update from it was accepted

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "token": self.token, "name": self.name, "shard_index": self.shard_index,
                "num_samples": self.num_samples, "active": self.active, "last_round": self.last_round,
                "decoder_bytes": self.decoder_bytes}  # fmt: skip


@dataclass
class RoundState:
    number: int
    participants: set[str]
    deadline: float
    strategy: Strategy
    started: float = field(default_factory=time.monotonic)
    attempt: int = 0  # 0: first try; n: n-th retry after a missed quorum
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
        state_dir: str | Path | None = None,
    ) -> None:
        self.plan = plan
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.data = plan.load_data()
        self.model = build_model(plan.model.name, self.data.input_shape, self.data.num_classes, plan.model.args, plan.seed)
        self.layout: Layout = model_layout(self.model)
        self.global_model = get_flat(self.model)
        # downlink.prior "initial" primes every collaborator's downlink with the initial model; kept only then.
        self.initial_model = self.global_model.copy() if plan.downlink.prior == "initial" else None
        self.up_chain: Pipeline = plan.uplink_chain()
        self.down_chain: Pipeline = plan.downlink_chain()
        self.server_optimizer = ServerOptimizer(plan.aggregation.server_optimizer)
        self.global_update = GlobalUpdate(plan.downlink_update_chain())
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
        self._completed = 0  # rounds finished (ok or failed); the next round is _completed + 1
        self._resumed_members = 0  # active members restored from a checkpoint
        self._prepass_done = False
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
                "downlink_update_chain": None if self.global_update.chain is None else str(self.global_update.chain),
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
        return {c.id for c in self._collaborators.values() if c.active and not c.lost}

    def _active_count(self) -> int:
        with self._cond:
            return len(self.active_ids())

    def join(self, name: str, num_samples: int, *, identity: str | None = None) -> JoinResult:
        """Register a collaborator. `identity` (the client certificate's common name under mTLS) is
        then its id; joining again under a known identity re-issues its token and resets its codec
        states (the collaborator restarted), keeping its shard."""
        if len(name) > MAX_NAME_LEN:
            raise InvalidArgument(f"name is longer than {MAX_NAME_LEN} characters")
        if num_samples < 0:
            raise InvalidArgument("num_samples must be >= 0")
        if identity is not None and not IDENTITY_RE.fullmatch(identity):
            raise PermissionDenied("the client certificate's common name is not a valid collaborator id")
        with self._cond:
            if self._phase == "done":
                raise FailedPrecondition("the federation has finished")
            known = self._collaborators.get(identity) if identity is not None else None
            if known is not None:
                with known.lock:
                    known.token = secrets.token_urlsafe(24)
                    known.up_state, known.down_state = self._fresh_up_state(known), self._fresh_down_state()
                known.active, known.lost = True, False
                known.num_samples = num_samples or known.num_samples
                if self._round is not None:
                    self._round.sent.pop(known.id, None)
                self._cond.notify_all()
                log.info("re-joined: %s", known.id)
                return JoinResult(known.id, known.token, self.plan.canonical(), self.plan.sha256, known.shard_index, self.plan.num_shards)
            index = self._joined
            self._joined += 1
            collab = Collaborator(
                id=identity if identity is not None else f"c{index:04d}-{secrets.token_hex(3)}",
                token=secrets.token_urlsafe(24),
                name=name or f"collaborator-{index}",
                shard_index=index % self.plan.num_shards,
                num_samples=num_samples,
                down_state=self._fresh_down_state(),
            )
            self._collaborators[collab.id] = collab
            self._cond.notify_all()
        log.info("joined: %s (%s), shard %d", collab.id, collab.name, collab.shard_index)
        return JoinResult(collab.id, collab.token, self.plan.canonical(), self.plan.sha256, collab.shard_index, self.plan.num_shards)

    def _fresh_up_state(self, collab: Collaborator) -> CodecState:
        """A new uplink receiver state, keeping an installed autoencoder decoder (it is not re-sent)."""
        state = CodecState()
        if self.prepass.index >= 0 and collab.up_state:
            state.stage(self.prepass.index).update(collab.up_state.stage(self.prepass.index))
        return state

    def _fresh_down_state(self) -> CodecState:
        """A new downlink sender state: empty, or primed with the initial model (`downlink.prior`)."""
        return self.plan.downlink_state(self.down_chain, self.initial_model)

    def authenticate(self, collaborator_id: str, token: str) -> Collaborator:
        """The caller's Collaborator, if the token is its own; a lost collaborator that calls in is back."""
        collab = self._collaborators.get(collaborator_id)
        if collab is None or not token:
            raise Unauthenticated("unknown collaborator or missing token: Join first")
        if not hmac.compare_digest(collab.token.encode(), token.encode()):
            raise Unauthenticated("invalid token for this collaborator")
        if not collab.active:
            raise FailedPrecondition("this collaborator has left the federation")
        if collab.lost:
            with self._cond:
                if collab.lost:
                    collab.lost = False
                    log.info("back: %s", collab.id)
                    self._cond.notify_all()
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
                # A stateful chain decodes into a copy: a refused update must not advance the state.
                state = CodecState.from_bytes(collab.up_state.to_bytes()) if chain.stateful else collab.up_state
                t0 = time.perf_counter()
                update = chain.decode(payload.data, layout, state)
                self.metrics.record_decode("up", self.up_codec, time.perf_counter() - t0)
        except CodecError as exc:
            with self._cond:
                rnd.receiving.discard(collab.id)
                self._cond.notify_all()
            raise InvalidArgument(f"update rejected: {exc}") from exc
        except BaseException:
            with self._cond:
                rnd.receiving.discard(collab.id)
                self._cond.notify_all()
            raise
        wire = len(payload_blob)
        with self._cond:
            rnd.receiving.discard(collab.id)
            if self._round is not rnd:
                self._cond.notify_all()
                raise FailedPrecondition(f"round {round_number} closed while the update was being decoded")
            rnd.strategy.accumulate(update, float(num_samples))
            collab.up_state = state
            rnd.submitted.add(collab.id)
            collab.last_round = round_number
            rnd.bytes["up_raw"] += self.layout.raw_bytes
            rnd.bytes["up_wire"] += wire
            self.metrics.record_transfer("up", self.up_codec, collab.id, raw=self.layout.raw_bytes, wire=wire)
            collab.num_samples = num_samples
            self._cond.notify_all()
        log.debug("update from %s for round %d: %d bytes", collab.id, round_number, wire)
        return wire

    def _check_open(self, collab: Collaborator, round_number: int) -> RoundState:
        """The open round this update belongs to, or the status that says why not."""
        if round_number == collab.last_round and round_number > 0:
            raise AlreadyExists(f"the update from {collab.id} for round {round_number} was already accepted")
        rnd = self._round
        if collab.id in self._receiving_any():
            raise Unavailable(f"an update from {collab.id} is being decoded; retry shortly")
        if self._phase != "training" or rnd is None:
            if 0 < round_number <= self._completed:
                raise FailedPrecondition(f"stale update: round {round_number} is closed (phase: {self._phase})")
            raise FailedPrecondition(f"no round is open (phase: {self._phase})")
        if round_number < rnd.number:
            raise FailedPrecondition(f"stale update: round {round_number} is closed, round {rnd.number} is open")
        if round_number != rnd.number:
            raise FailedPrecondition(f"update for round {round_number}, but round {rnd.number} is open")
        if collab.id not in rnd.participants:
            raise PermissionDenied(f"{collab.id} was not selected for round {rnd.number}")
        if collab.id in rnd.submitted:
            raise AlreadyExists(f"duplicate update from {collab.id} for round {rnd.number}")
        return rnd

    def _receiving_any(self) -> set[str]:
        return self._round.receiving if self._round is not None else set()

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
        if self.resumed_from is None or not self._prepass_done:
            self.prepass.run(stop)
            self._prepass_done = True
        if self.resumed_from is None:
            loss, acc = self._evaluate()
            self.report.extra["initial_accuracy"] = acc
            self.checkpoint()
            self.report.write()
        for number in range(self._completed + 1, plan.rounds + 1):
            if stop.is_set():
                break
            record = self._run_round(number, stop)
            if stop.is_set():
                break  # interrupted, not finished: not recorded; a restart on the state dir re-runs it
            self.report.rounds.append(record)
            self._completed = number
            self.checkpoint()  # before the next round opens: a restart resumes at number + 1
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
        if self.resumed_from is not None:
            # After a restart: wait for the members that were active to call in again.
            need = max(1, min(need, self._resumed_members))
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

    def _new_strategy(self) -> Strategy:
        a = self.plan.aggregation
        return build_strategy(self.plan.uplink.target, a.clip_norm, a.robust, a.trim_fraction)

    def _run_round(self, number: int, stop: threading.Event) -> RoundRecord:
        quorum, retries = self.plan.quorum, self.plan.round_retries
        with self._cond:
            participants = self._select(number)
            strategy = self._new_strategy()
            strategy.begin(self.global_model)
            rnd = RoundState(number, participants, time.monotonic() + self.plan.round_timeout_s, strategy)
            self._round = rnd
            self._phase = "training"
            self._cond.notify_all()
            while True:
                self._wait_round(rnd, stop)
                if strategy.count >= quorum or rnd.attempt >= retries or stop.is_set():
                    break
                # Quorum missed: re-open the round (same number, same global model, the updates it
                # has kept) for another deadline, open to every active collaborator.
                rnd.attempt += 1
                rnd.participants |= self.active_ids()
                rnd.deadline = time.monotonic() + self.plan.round_timeout_s
                log.warning("round %d: %d of %d updates by the deadline; retry %d of %d", number, strategy.count, quorum, rnd.attempt, retries)
                self._cond.notify_all()
            # Wait briefly for updates already being decoded.
            grace = time.monotonic() + 5.0
            while rnd.receiving and time.monotonic() < grace:
                self._cond.wait(0.05)
            self._round = None
            missing = rnd.participants - rnd.submitted
            for cid in missing:  # selected, alive or not, and silent until the deadline
                c = self._collaborators.get(cid)
                if c is not None and c.active and not stop.is_set():
                    c.lost = True
            dropped = len(missing)
            count = strategy.count
        if count >= quorum:
            status = "ok" if rnd.attempt == 0 else "retried"
            proposed = self.server_optimizer.apply(self.global_model, strategy.finish())
            self.global_model = self.global_update.apply(self.global_model, proposed, self.layout)
            if self.global_update.last_stats is not None:
                self.metrics.record_encode("global", str(self.global_update.chain), self.global_update.last_stats)
        else:
            status = f"failed: quorum not met ({count} of {quorum} updates) after {rnd.attempt} retries; the global model is unchanged"
            log.warning("round %d %s", number, status)
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
            attempts=rnd.attempt + 1,
        )

    def _wait_round(self, rnd: RoundState, stop: threading.Event) -> None:
        """Until quorum is met and every selected active collaborator has submitted, or the deadline
        (under _cond). When the selected ones can no longer make quorum, every active one may join in."""
        quorum = self.plan.quorum
        while not stop.is_set() and time.monotonic() < rnd.deadline:
            active = self.active_ids()
            pending = (rnd.participants & active) - rnd.submitted
            if rnd.strategy.count >= quorum and not pending:
                return
            if rnd.strategy.count + len(pending) < quorum and active - rnd.participants:
                rnd.participants |= active
                self._cond.notify_all()
            self._cond.wait(0.25)

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self) -> Path | None:
        """Write the state directory's checkpoint (atomic); between rounds, from the round thread."""
        if self.state_dir is None:
            return None
        with self._cond:
            members = list(self._collaborators.values())
            meta = {
                "members": [c.to_json() for c in members],
                "joined": self._joined,
                "prepass": {
                    "done": self._prepass_done,
                    "started": sorted(self.prepass.started),
                    "installed": dict(self.prepass.installed),
                    "trainer": self.prepass.trainer,
                    "shared_sent": sorted(self.prepass.shared_sent),
                    "prepass_bytes": dict(self.report.prepass_bytes),
                },
                "report": {"rounds": [r.to_json() for r in self.report.rounds], "extra": self.report.extra},
            }
            model = self.global_model.copy()
            server_state = self.global_update.state.to_bytes()
            optimizer_state = self.server_optimizer.state_bytes()
            states: dict[str, tuple[bytes, bytes]] = {}
            for c in members:
                with c.lock:
                    states[c.id] = (c.up_state.to_bytes(), c.down_state.to_bytes())
        ckpt = checkpoint.Checkpoint(round=self._completed, plan_sha256=self.plan.sha256, global_model=model, states=states, meta=meta,
                                     server_state=server_state, optimizer_state=optimizer_state)  # fmt: skip
        path = checkpoint.save(self.state_dir, ckpt, self.layout)
        log.info("checkpoint after round %d: %s", self._completed, path)
        return path

    def _restore(self) -> None:
        assert self.state_dir is not None
        ckpt = checkpoint.load(self.state_dir, self.plan.sha256, self.layout)
        if ckpt is None:
            return
        meta = ckpt.meta
        try:
            self.global_model = ckpt.global_model.astype(np.float32)
            self.global_update.state = CodecState.from_bytes(ckpt.server_state) if ckpt.server_state else CodecState()
            self.server_optimizer.load_state(ckpt.optimizer_state, self.layout.numel)
            for m in meta["members"]:
                up, down = ckpt.states[m["id"]]
                collab = Collaborator(
                    id=m["id"], token=m["token"], name=m["name"], shard_index=int(m["shard_index"]),
                    num_samples=int(m["num_samples"]), active=bool(m["active"]), last_round=int(m["last_round"]),
                    decoder_bytes=int(m.get("decoder_bytes", 0)), lost=True,  # until it calls in again
                    up_state=CodecState.from_bytes(up), down_state=CodecState.from_bytes(down),
                )  # fmt: skip
                self._collaborators[collab.id] = collab
            self._resumed_members = sum(1 for c in self._collaborators.values() if c.active)
            self._joined = int(meta["joined"])
            pre = meta.get("prepass", {})
            self._prepass_done = bool(pre.get("done", False))
            self.prepass.started = set(pre.get("started", []))
            self.prepass.installed = {str(k): int(v) for k, v in pre.get("installed", {}).items()}
            self.prepass.trainer = pre.get("trainer")
            self.prepass.shared_sent = set(pre.get("shared_sent", []))
            self.report.prepass_bytes.update(pre.get("prepass_bytes", {}))
            rep = meta.get("report", {})
            self.report.rounds = [RoundRecord(**r) for r in rep.get("rounds", [])]
            self.report.extra.update(rep.get("extra", {}))
        except (KeyError, TypeError, ValueError, CodecError, ServerOptimizerError) as exc:
            raise checkpoint.CheckpointError(f"{self.state_dir}: malformed checkpoint: {exc}") from exc
        self._completed = ckpt.round
        self.resumed_from = ckpt.round
        self.report.extra["resumed_after_round"] = self.report.extra.get("resumed_after_round", []) + [ckpt.round]
        log.info("resumed from %s after round %d (%d members)", self.state_dir, ckpt.round, len(self._collaborators))

    def _evaluate(self) -> tuple[float, float]:
        set_flat(self.model, self.global_model)
        return evaluate(self.model, self.data.x_test, self.data.y_test)

    def shutdown(self) -> None:
        with self._cond:
            self._phase = "done"
            self._cond.notify_all()
