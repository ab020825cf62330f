"""The collaborator's gRPC client: retries, chunked uploads; protobuf and gRPC stay at this edge.

It speaks domain objects (`Admission`, `Task`, `Payload`) and raises domain errors
(`fedsqueeze.errors`, mapped from the status by `fedsqueeze/wire.py`), so the collaborator's code
never sees a status code. Every call retries UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED by the
aggregator (a server stopping cancels its calls in flight) with capped
exponential backoff and jitter: before Join for `connect_timeout` seconds, afterwards (the
aggregator restarting, say) for `reconnect_timeout`, then raises `Unreachable`. RESOURCE_EXHAUSTED
is retried the same way (an aggregator with all its upload slots taken, `--max-concurrent-uploads`),
except gRPC's own "message larger than max", which no retry can cure. An update is identified by
(collaborator, round), so a resent upload is safe: ALREADY_EXISTS means an earlier attempt was
accepted, and counts as success.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from fedsqueeze.codecs import Layout
from fedsqueeze.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unreachable
from fedsqueeze.messages import Evaluation, Task
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan
from fedsqueeze.tls import ClientTLS
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc
from fedsqueeze.wire import (
    error_from_status,
    layout_from_proto,
    layout_to_proto,
    payload_from_bytes,
    payload_from_proto,
    payload_to_bytes,
)

log = logging.getLogger("fedsqueeze.collaborator")

CHUNK_SIZE = 1 << 20  # the aggregator accepts chunks of at most 1 MiB (aggregator/servicer.py MAX_CHUNK)
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
BACKOFF_INITIAL_S = 0.2
BACKOFF_CAP_S = 5.0


def backoff_delays(initial: float = BACKOFF_INITIAL_S, cap: float = BACKOFF_CAP_S) -> Iterator[float]:
    """Capped exponential backoff with jitter: uniform in [d/2, d], d = initial * 2^n capped at `cap`."""
    d = initial
    while True:
        yield d * random.uniform(0.5, 1.0)
        d = min(d * 2, cap)


# gRPC's own details when this process cancelled the call or closed the channel: nothing to retry.
CANCELLED_HERE = ("Locally cancelled by application!", "Channel closed!")


def retryable(code: grpc.StatusCode, details: str) -> bool:
    """A status worth retrying: transient, or an aggregator busy with other uploads."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return False  # "Sent/Received message larger than max (N vs. M)": permanent
    if code == grpc.StatusCode.CANCELLED:
        # cancelled by the aggregator: a server stopping (SIGTERM, a restart) cancels the calls it has
        # in flight when its grace period ends, and the restarted one answers the retry
        return details not in CANCELLED_HERE
    return code in RETRYABLE


T = TypeVar("T")


@dataclass
class Session:
    """This collaborator's membership, from Join."""

    collaborator_id: str
    token: str
    plan: Plan
    shard_index: int
    num_shards: int
    layout: Layout | None = None  # the federation's model: the tensors that travel, in flattening order


@dataclass(frozen=True)
class Model:
    """What a collaborator tells the aggregator of its model at Join, to be refused at once if it differs."""

    layout: Layout  # every floating-point tensor, parameters and buffers
    buffers: tuple[str, ...] = ()  # which of them are buffers
    evaluates: bool = False  # it will evaluate the global models on its own held-out data


class FederationClient:
    def __init__(
        self,
        address: str,
        *,
        connect_timeout: float = 60.0,
        reconnect_timeout: float = 300.0,
        max_message: int = 256 << 20,
        tls: ClientTLS | None = None,
        join_token: str = "",
    ) -> None:
        self.address = address
        self.max_message = max_message
        self.join_token = join_token  # the federation's join secret or this collaborator's enrollment token
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", max_message),
        ]
        if tls is not None:
            self.channel = grpc.secure_channel(address, tls.credentials(), options=options + tls.options())
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.session: Session | None = None
        self.name = ""
        self.num_samples = 0
        self.model: Model | None = None  # what Join told the aggregator of this collaborator's model

    def close(self) -> None:
        self.channel.close()

    def _call(self, what: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run `fn`, retrying transient statuses with capped exponential backoff and jitter; other
        statuses raise their domain error."""
        if timeout is not None:
            budget = timeout
        else:
            budget = (
                self.connect_timeout
                if self.session is None
                else max(self.connect_timeout, self.reconnect_timeout)
            )
        deadline = time.monotonic() + budget
        delays = backoff_delays()
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                details = exc.details() or ""  # type: ignore[attr-defined]
                if not retryable(code, details):
                    raise error_from_status(code, details) from None
                delay = next(delays)
                if time.monotonic() + delay > deadline:
                    problem = (
                        "the aggregator stayed busy at"
                        if code == grpc.StatusCode.RESOURCE_EXHAUSTED
                        else "could not reach the aggregator at"
                    )
                    raise Unreachable(
                        f"{problem} {self.address} for {budget:.0f} s ({what}: {code.name})"
                    ) from None
                log.info("%s: %s, retrying in %.1f s", what, code.name, delay)
                time.sleep(delay)

    def _credentials(self) -> pb.Credentials:
        assert self.session is not None, "join first"
        return pb.Credentials(collaborator_id=self.session.collaborator_id, token=self.session.token)

    def join(self, name: str, num_samples: int = 0, model: Model | None = None) -> Session:
        """Join; joining again (see `rejoin`) must find the same plan. With `model`, an aggregator whose
        model differs refuses the Join (InvalidArgument naming the first tensor that differs)."""
        request = pb.JoinRequest(name=name, num_samples=num_samples, join_token=self.join_token)
        if model is not None:
            request.layout.CopyFrom(layout_to_proto(model.layout))
            request.buffers.extend(model.buffers)
            request.evaluates = model.evaluates
        resp = self._call("join", lambda: self.stub.Join(request, timeout=30, wait_for_ready=False))
        plan = Plan.from_json(json.loads(resp.plan.json))
        if plan.sha256 != resp.plan.sha256:
            raise InvalidArgument("the plan's digest does not match the plan the aggregator sent")
        if self.session is not None and plan.sha256 != self.session.plan.sha256:
            raise FailedPrecondition(
                f"the aggregator now runs another plan ({plan.sha256[:12]}…, joined {self.session.plan.sha256[:12]}…): not resuming"
            )
        self.name, self.num_samples, self.model = name, num_samples, model
        layout = layout_from_proto(resp.layout) if resp.HasField("layout") else None
        self.session = Session(
            resp.collaborator_id, resp.token, plan, resp.shard_index, resp.num_shards, layout
        )
        return self.session

    def rejoin(self) -> Session:
        """Join again after UNAUTHENTICATED (an aggregator restarted without our membership)."""
        old = self.session
        session = self.join(self.name, self.num_samples, self.model)
        log.warning("re-joined as %s (was %s)", session.collaborator_id, old.collaborator_id if old else None)
        return session

    def get_task(self, wait_s: float = 10.0) -> Task:
        req = pb.GetTaskRequest(credentials=self._credentials(), wait_ms=int(wait_s * 1000))
        resp = self._call("get task", lambda: self.stub.GetTask(req, timeout=wait_s + 30))
        kind = pb.GetTaskResponse.Kind.Name(resp.kind)
        if kind not in ("WAIT", "TRAIN", "PREPASS", "DONE", "EVALUATE"):
            raise InvalidArgument(f"the aggregator sent a task of unknown kind {kind}")
        if resp.HasField("model"):
            model: Payload | None = payload_from_proto(resp.model)
        elif resp.model_size:
            model = self.fetch_model(resp.round, resp.model_size)
        else:
            model = None
        return Task(kind, resp.round, model, resp.message, resp.completed)  # type: ignore[arg-type]

    def fetch_model(self, round_number: int, size: int) -> Payload:
        """A download too large for GetTask's answer, in chunks; exactly `size` bytes."""
        if not 0 < size <= self.max_message:
            raise InvalidArgument(f"the aggregator announced a model of {size} bytes")
        req = pb.FetchModelRequest(credentials=self._credentials(), round=round_number)

        def fetch() -> bytes:
            buf = bytearray()
            for part in self.stub.FetchModel(req, timeout=600):
                buf += part.chunk
                if len(buf) > size:
                    raise InvalidArgument(f"the model stream carries more than the announced {size} bytes")
            return bytes(buf)

        blob = self._call("fetch model", fetch)
        if len(blob) != size:
            raise InvalidArgument(f"the model stream ended after {len(blob)} of the announced {size} bytes")
        return payload_from_bytes(blob)

    def submit_update(
        self,
        round_number: int,
        num_samples: int,
        payload: Payload,
        metrics: dict[str, float],
        evaluation: Evaluation | None = None,
    ) -> int:
        """Stream the serialized Payload in chunks; returns the wire bytes (its serialized size)."""
        blob = payload_to_bytes(payload)
        header = pb.UpdateHeader(
            credentials=self._credentials(),
            round=round_number,
            num_samples=num_samples,
            payload_size=len(blob),
            metrics=metrics,
        )
        if evaluation is not None and evaluation.samples > 0:
            header.evaluation.update(evaluation.metrics)
            header.evaluation_samples = evaluation.samples

        def requests() -> Iterator[pb.SubmitUpdateRequest]:
            yield pb.SubmitUpdateRequest(header=header)
            for start in range(0, len(blob), CHUNK_SIZE):
                yield pb.SubmitUpdateRequest(chunk=blob[start : start + CHUNK_SIZE])

        try:
            self._call("submit update", lambda: self.stub.SubmitUpdate(requests(), timeout=300))
        except AlreadyExists:
            log.info("round %d: the update was already accepted (a resend)", round_number)
        return len(blob)

    def submit_evaluation(self, round_number: int, evaluation: Evaluation) -> None:
        req = pb.EvaluationRequest(credentials=self._credentials(), round=round_number, metrics=dict(evaluation.metrics),
                                   num_samples=evaluation.samples)  # fmt: skip
        self._call("submit evaluation", lambda: self.stub.SubmitEvaluation(req, timeout=60))

    def upload_decoder(self, architecture: dict[str, Any], blob: bytes) -> int:
        arch = pb.DecoderArchitecture(
            kind=str(architecture["kind"]),
            sizes={k: int(v) for k, v in architecture.get("sizes", {}).items()},
        )
        header = pb.DecoderHeader(credentials=self._credentials(), architecture=arch, size=len(blob))

        def requests() -> Iterator[pb.UploadDecoderRequest]:
            yield pb.UploadDecoderRequest(header=header)
            for start in range(0, len(blob), CHUNK_SIZE):
                yield pb.UploadDecoderRequest(chunk=blob[start : start + CHUNK_SIZE])

        resp = self._call("upload decoder", lambda: self.stub.UploadDecoder(requests(), timeout=600))
        return int(resp.bytes_received)

    def leave(self, reason: str = "done") -> None:
        try:
            self.stub.Leave(pb.LeaveRequest(credentials=self._credentials(), reason=reason), timeout=5)
        except grpc.RpcError as exc:
            log.info("leave: %s", exc.code())  # type: ignore[attr-defined]
