"""Thin gRPC servicer (asyncio): protobuf in, a Federation call, protobuf out; domain errors become statuses.

Each handler converts its request with the pure functions of `fedsqueeze/wire.py`, calls one
Federation method, and converts the answer back; `_answer` maps the domain errors to their status
codes, so the Federation never sees protobuf or gRPC. Federation calls run on a small thread pool
(they take its lock, and encoding or decoding is CPU work), never on the event loop; waiting
(long polls, upload slots, slow streams) is asyncio and holds no thread, so hundreds of stalled or
hostile streams cost the server a few KiB each, not its threads.

Hostile peers (README "Hostile peers"):
- requests that are not valid protobuf get INVALID_ARGUMENT (the deserializers never raise);
- an upload stream is a header, then chunks. The header must arrive within `header_timeout_s`, and
  its credentials, round and declared size are checked before a byte of the payload is read or an
  upload slot taken; no decoder bytes at all are accepted from a plan without an autoencoder;
- every later chunk must arrive within `idle_timeout_s`, the whole stream within a deadline that
  grows with the declared size, and chunks must not be tiny (at least `MIN_CHUNK` but the last);
- long polls end when the client cancels them; one identity may hold a few long polls and one
  upload at once (`IdentityLimits`); a client-cancelled call is one INFO line, not an error.
Under mutual TLS the client certificate's common name is the collaborator's identity: Join
registers under it and every other RPC must carry credentials for that id (PERMISSION_DENIED).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict

from fedsqueeze.errors import (
    FailedPrecondition,
    FederationError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from fedsqueeze.messages import Evaluation
from fedsqueeze.payload import Payload
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.wire import (
    layout_from_proto,
    layout_to_proto,
    payload_from_bytes,
    payload_to_bytes,
    payload_to_proto,
    status_of,
)

from .upload_slots import DEFAULT_MAX_CONCURRENT_UPLOADS, DEFAULT_UPLOAD_WAIT_S, IdentityLimits, UploadSlots

if TYPE_CHECKING:  # the CLI imports this module for its defaults without loading torch
    from .federation import Federation

log = logging.getLogger("fedsqueeze.aggregator")

F = TypeVar("F", bound=Callable[..., Any])

# the largest chunk message (and so the most gRPC buffers of a stream before it is authenticated)
MAX_CHUNK = 1 << 20
INLINE_MODEL = 1 << 20  # a download larger than this travels apart, in chunks (FetchModel)
MIN_CHUNK = 4 << 10  # every chunk but the last carries at least this much: no floods of empty chunks
SERVICE = "fedsqueeze.v1.Federation"
# RPCs that carry a message counted in fedsqueeze_messages_total by status: (direction, type).
_MESSAGES = {"SubmitUpdate": ("up", "update"), "UploadDecoder": ("up", "decoder")}


@dataclass(frozen=True)
class StreamLimits:
    header_timeout_s: float = 10.0  # from the stream's start to its header
    idle_timeout_s: float = 15.0  # between two chunks
    base_deadline_s: float = 60.0  # the whole stream: this much, plus its declared size at `min_rate`
    min_rate: float = 16 << 10  # bytes per second the slowest legitimate link sustains

    def deadline(self, size: int) -> float:
        return self.base_deadline_s + size / self.min_rate


class Malformed:
    """Stands for a request message that did not parse."""

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            return Malformed(f"{type(exc).__name__}: {exc}")

    return deserialize


def _well_formed(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise InvalidArgument(f"the request is not a valid protobuf message ({request.error})")
    return request


def add_to_server(servicer: FederationServicer, server: Any) -> None:
    """Register the handlers, with deserializers that never raise (a grpc.aio server)."""
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_unary_rpc_method_handler
    handlers = {
        "Join": unary(servicer.Join, _safe(pb.JoinRequest.FromString), pb.JoinResponse.SerializeToString),
        "GetTask": unary(
            servicer.GetTask, _safe(pb.GetTaskRequest.FromString), pb.GetTaskResponse.SerializeToString
        ),
        "SubmitUpdate": stream(
            servicer.SubmitUpdate,
            _safe(pb.SubmitUpdateRequest.FromString),
            pb.SubmitUpdateResponse.SerializeToString,
        ),
        "UploadDecoder": stream(
            servicer.UploadDecoder,
            _safe(pb.UploadDecoderRequest.FromString),
            pb.UploadDecoderResponse.SerializeToString,
        ),
        "Leave": unary(servicer.Leave, _safe(pb.LeaveRequest.FromString), pb.LeaveResponse.SerializeToString),
        "FetchModel": grpc.unary_stream_rpc_method_handler(
            servicer.FetchModel, _safe(pb.FetchModelRequest.FromString), pb.ModelChunk.SerializeToString
        ),
        "SubmitEvaluation": unary(
            servicer.SubmitEvaluation,
            _safe(pb.EvaluationRequest.FromString),
            pb.EvaluationResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _answer(method: F) -> F:
    """Turn domain errors into gRPC statuses; anything unexpected becomes INTERNAL, logged."""
    message = _MESSAGES.get(method.__name__)

    @functools.wraps(method)
    async def wrapper(self: FederationServicer, request: Any, context: Any) -> Any:
        status = grpc.StatusCode.INTERNAL
        try:
            if not isinstance(request, AsyncIterable):
                _well_formed(request)
            result = await method(self, request, context)
            status = grpc.StatusCode.OK
            return result
        except FederationError as exc:
            if _cancelled(context):  # the client went away: nothing to answer, and nothing went wrong here
                status = grpc.StatusCode.CANCELLED
                log.info("%s cancelled by the client", method.__name__)
                return None
            status = status_of(exc)
            await context.abort(status, exc.message)
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            log.info("%s cancelled by the client", method.__name__)
            raise
        except Exception as exc:
            if _is_abort(exc):
                raise  # context.abort's own exception: the status is set
            log.exception("internal error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            if (
                message is not None and status != grpc.StatusCode.OK
            ):  # accepted ones: Federation's record_transfer
                self.fed.metrics.record_message(*message, status.name)

    return wrapper  # type: ignore[return-value]


def _cancelled(context: Any) -> bool:
    cancelled = getattr(context, "cancelled", None)
    return bool(cancelled()) if callable(cancelled) else False


def _is_abort(exc: BaseException) -> bool:
    return type(exc).__name__ == "AbortError"


CANCEL_SETTLE_S = 0.5


async def _settle() -> None:
    """A stream that ends early was often cancelled by its client: gRPC then cancels this handler within
    moments (CancelledError, logged as one INFO line). Wait that long before answering it as truncated."""
    await asyncio.sleep(CANCEL_SETTLE_S)


class _Stream:
    """An upload's request stream, read with timeouts."""

    def __init__(self, requests: AsyncIterable[Any]) -> None:
        self._it = requests.__aiter__()

    async def next(self, timeout: float, what: str) -> Any | None:
        try:
            # asyncio.timeout, not wait_for: wait_for's inner task can swallow the cancellation gRPC sends
            # when the client cancels (the read ends at the same moment), and the cancel would go unnoticed.
            async with asyncio.timeout(timeout):
                return _well_formed(await self._it.__anext__())
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise Unavailable(f"{what}: nothing arrived for {timeout:g} s") from None

    async def header(self, limits: StreamLimits) -> Any:
        first = await self.next(limits.header_timeout_s, "waiting for the header")
        if first is None:
            await _settle()
            raise InvalidArgument("empty stream: the first message must be a header")
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message of the stream must be a header")
        return first.header

    async def payload(self, declared: int, limits: StreamLimits) -> bytes:
        """The chunks after the header, adding up to exactly the declared size."""
        buf = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.deadline(declared)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(
                    f"the upload took longer than its deadline of {limits.deadline(declared):.0f} s"
                )
            req = await self.next(
                min(limits.idle_timeout_s, remaining), f"after {len(buf)} of {declared} bytes"
            )
            if req is None:
                break
            if req.WhichOneof("part") != "chunk":
                raise InvalidArgument("only chunks may follow the header")
            size = len(req.chunk)
            if size > MAX_CHUNK:
                raise InvalidArgument(f"chunk of {size} bytes exceeds {MAX_CHUNK}")
            if len(buf) + size > declared:
                raise InvalidArgument(f"stream carries more than the declared {declared} bytes")
            if size < MIN_CHUNK and len(buf) + size < declared:
                raise InvalidArgument(
                    f"chunk of {size} bytes: every chunk but the last carries at least {MIN_CHUNK}"
                )
            buf += req.chunk
        if len(buf) != declared:
            await _settle()
            raise InvalidArgument(f"stream ended after {len(buf)} of the declared {declared} bytes")
        return bytes(buf)


class FederationServicer:
    def __init__(
        self,
        federation: Federation,
        *,
        mutual_tls: bool = False,
        max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
        upload_wait_s: float = DEFAULT_UPLOAD_WAIT_S,
        limits: StreamLimits | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.fed = federation
        self.mutual_tls = mutual_tls
        self.uploads = UploadSlots(max_concurrent_uploads, federation.metrics, upload_wait_s)
        self.identities = IdentityLimits()
        self.limits = limits or StreamLimits()
        # Federation calls: bookkeeping, and the encodes and decodes (at most one per upload slot at a time).
        self.executor = executor or ThreadPoolExecutor(
            max_workers=max_concurrent_uploads + 8, thread_name_prefix="federation"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks_changed: asyncio.Event | None = None
        self._stopping = False
        # Each member's last download too large to answer inline: (round, payload), served by FetchModel
        # (and again if a fetch is retried) until its next task replaces it or it leaves.
        self._large: dict[str, tuple[int, Payload]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve from `loop`: long polls wait there for the Federation to announce new tasks."""
        self._loop = loop
        self._tasks_changed = asyncio.Event()

        def announce() -> None:
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: the server has stopped
                pass

        self.fed.watch_tasks(announce)

    def stopping(self) -> None:
        """The server is stopping (on the event loop): long polls answer UNAVAILABLE now, so their clients retry."""
        self._stopping = True
        if self._tasks_changed is not None:
            self._wake()

    def _wake(self) -> None:
        assert self._tasks_changed is not None
        old, self._tasks_changed = self._tasks_changed, asyncio.Event()
        old.set()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    def _identity(self, context: Any) -> str | None:
        """Under mTLS, the verified client certificate's common name; None without mTLS."""
        if not self.mutual_tls:
            return None
        names = context.auth_context().get("x509_common_name") or []
        if not names:
            raise Unauthenticated("a client certificate with a common name is required")
        return bytes(names[0]).decode("utf-8", "replace")

    def _as(self, context: Any, cred: pb.Credentials) -> tuple[str, str]:
        """(id, token) of the caller, refusing to act for an id other than the certificate's."""
        identity = self._identity(context)
        if identity is not None and cred.collaborator_id != identity:
            raise PermissionDenied(
                f"the client certificate {identity!r} cannot act as {cred.collaborator_id!r}"
            )
        return cred.collaborator_id, cred.token

    @_answer
    async def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinResponse:
        layout = layout_from_proto(request.layout) if request.HasField("layout") else None
        r = await self._call(
            self.fed.join, request.name, request.num_samples, self._identity(context), request.join_token,
            layout, tuple(request.buffers), request.evaluates,
        )  # fmt: skip
        resp = pb.JoinResponse(collaborator_id=r.collaborator_id, token=r.token, plan=pb.Plan(json=r.plan_json, sha256=r.plan_sha256),
                               shard_index=r.shard_index, num_shards=r.num_shards)  # fmt: skip
        if r.layout is not None:
            resp.layout.CopyFrom(layout_to_proto(r.layout))
        return resp

    @_answer
    async def GetTask(self, request: pb.GetTaskRequest, context: Any) -> pb.GetTaskResponse:
        who = self._as(context, request.credentials)
        member = await self._call(self.fed.authenticate, *who)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(request.wait_ms / 1000.0, self.fed.max_poll_s))
        with self.identities.poll(member.id):
            while True:
                if self._stopping:
                    raise Unavailable(
                        "the aggregator is stopping (a restart on its state dir resumes the federation): retry"
                    )
                changed = self._tasks_changed  # before looking: a task announced meanwhile wakes us
                task = await self._call(self.fed.get_task, *who, 0.0)
                remaining = deadline - loop.time()
                if task.kind != "WAIT" or remaining <= 0 or changed is None:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        await changed.wait()
                except TimeoutError:
                    pass
        resp = pb.GetTaskResponse(kind=pb.GetTaskResponse.Kind.Value(task.kind), round=task.round, message=task.message,
                                  completed=task.completed)  # fmt: skip
        if task.model is not None:
            if task.model.wire_size <= INLINE_MODEL:
                resp.model.CopyFrom(payload_to_proto(task.model))
            else:  # too large for one message: the client fetches it in chunks
                self._large[member.id] = (task.round, task.model)
                resp.model_size = task.model.wire_size
        return resp

    @_answer
    async def FetchModel(self, request: pb.FetchModelRequest, context: Any) -> None:
        member = await self._call(self.fed.authenticate, *self._as(context, request.credentials))
        large = self._large.get(member.id)
        if large is None or large[0] != request.round:
            raise FailedPrecondition(f"{member.id} was announced no large download for round {request.round}")
        payload = large[1]
        blob = await self._call(payload_to_bytes, payload)
        for start in range(0, len(blob), MAX_CHUNK):
            await context.write(pb.ModelChunk(chunk=blob[start : start + MAX_CHUNK]))

    @_answer
    async def SubmitEvaluation(self, request: pb.EvaluationRequest, context: Any) -> pb.EvaluationResponse:
        evaluation = Evaluation(dict(request.metrics), request.num_samples)
        await self._call(
            self.fed.submit_evaluation, *self._as(context, request.credentials), request.round, evaluation
        )
        return pb.EvaluationResponse()

    @_answer
    async def SubmitUpdate(
        self, request_iterator: AsyncIterable[Any], context: Any
    ) -> pb.SubmitUpdateResponse:
        stream = _Stream(request_iterator)
        header = await stream.header(self.limits)
        who = self._as(context, header.credentials)
        await self._call(self.fed.check_update, *who, header.round, header.num_samples, header.payload_size)
        with self.identities.upload(who[0]):
            async with self.uploads.slot():
                blob = await stream.payload(header.payload_size, self.limits)
                metrics = dict(header.metrics)
                evaluation = (
                    Evaluation(dict(header.evaluation), header.evaluation_samples)
                    if header.evaluation_samples
                    else None
                )

                def submit() -> int:
                    return self.fed.submit_update(
                        *who,
                        header.round,
                        header.num_samples,
                        payload_from_bytes(blob),
                        len(blob),
                        metrics,
                        evaluation,
                    )

                wire = await self._call(submit)
        return pb.SubmitUpdateResponse(accepted=True, message="accepted", bytes_received=wire)

    @_answer
    async def UploadDecoder(
        self, request_iterator: AsyncIterable[Any], context: Any
    ) -> pb.UploadDecoderResponse:
        stream = _Stream(request_iterator)
        header = await stream.header(self.limits)
        who = self._as(context, header.credentials)
        architecture = MessageToDict(header.architecture, preserving_proto_field_name=True)
        await self._call(self.fed.check_decoder, *who, architecture, header.size)
        with self.identities.upload(who[0]):
            async with self.uploads.slot():
                blob = await stream.payload(header.size, self.limits)
                n = await self._call(self.fed.upload_decoder, *who, architecture, blob)
        return pb.UploadDecoderResponse(accepted=True, message="decoder accepted", bytes_received=n)

    @_answer
    async def Leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveResponse:
        member_id = self._as(context, request.credentials)[0]
        await self._call(self.fed.leave, *self._as(context, request.credentials))
        self._large.pop(member_id, None)
        return pb.LeaveResponse()
