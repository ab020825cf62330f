"""Thin gRPC servicer: unpack protobuf, call the Federation, map domain errors to status codes.

Requests that are not valid protobuf get INVALID_ARGUMENT (not gRPC's default INTERNAL): the
handlers are registered with deserializers that turn a parse error into a `Malformed` marker.
Under mutual TLS the client certificate's common name is the collaborator's identity: Join
registers under it and every other RPC must carry credentials for that id (PERMISSION_DENIED).

Uploads (SubmitUpdate, UploadDecoder) take one of `max_concurrent_uploads` slots while they are
read and decoded (`UploadSlots`), so the aggregator holds at most that many uploads in memory
whatever the number of collaborators; GetTask, Join, Leave and health checks take none.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict

from fedsqueeze.codecs import CodecError
from fedsqueeze.errors import (
    FederationError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from fedsqueeze.metrics import Metrics
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc
from fedsqueeze.wire import payload_to_proto

if TYPE_CHECKING:  # the CLI imports this module for its defaults without loading torch
    from .federation import Federation

log = logging.getLogger("fedsqueeze.aggregator")

F = TypeVar("F", bound=Callable[..., Any])

MAX_CHUNK = 4 << 20
# Uploads read and decoded at once (`aggregator serve --max-concurrent-uploads`), and how long
# another may wait for a slot before it is refused with RESOURCE_EXHAUSTED (and retried).
DEFAULT_MAX_CONCURRENT_UPLOADS = 8
DEFAULT_UPLOAD_WAIT_S = 30.0
# RPCs that carry a message counted in fedsqueeze_messages_total by status: (direction, type).
_MESSAGES = {"SubmitUpdate": ("up", "update"), "UploadDecoder": ("up", "decoder")}


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


def add_to_server(servicer: FederationServicer, server: grpc.Server) -> None:
    """Like the generated add_FederationServicer_to_server, with deserializers that never raise."""
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_unary_rpc_method_handler
    handlers = {
        "Join": unary(servicer.Join, _safe(pb.JoinRequest.FromString), pb.JoinResponse.SerializeToString),
        "GetTask": unary(servicer.GetTask, _safe(pb.GetTaskRequest.FromString), pb.GetTaskResponse.SerializeToString),
        "SubmitUpdate": stream(servicer.SubmitUpdate, _safe(pb.SubmitUpdateRequest.FromString), pb.SubmitUpdateResponse.SerializeToString),
        "UploadDecoder": stream(servicer.UploadDecoder, _safe(pb.UploadDecoderRequest.FromString), pb.UploadDecoderResponse.SerializeToString),
        "Leave": unary(servicer.Leave, _safe(pb.LeaveRequest.FromString), pb.LeaveResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fedsqueeze.v1.Federation", handlers),))
    server.add_registered_method_handlers("fedsqueeze.v1.Federation", handlers)


def _mapped(method: F) -> F:
    """Turn domain errors into gRPC statuses; anything unexpected becomes INTERNAL, logged."""
    message = _MESSAGES.get(method.__name__)

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        status = grpc.StatusCode.INTERNAL
        try:
            if not isinstance(request, Iterator):
                _well_formed(request)
            result = method(self, request, context)
            status = grpc.StatusCode.OK
            return result
        except FederationError as exc:
            status = exc.code
            context.abort(exc.code, exc.message)
        except CodecError as exc:
            status = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 - the server must keep serving
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            if message is not None and status != grpc.StatusCode.OK:  # accepted ones: Federation.record_transfer
                self.fed.metrics.record_message(*message, status.name)

    return wrapper  # type: ignore[return-value]


def _assemble(requests: Iterator[Any], header_field: str, size_field: str, limit: int) -> tuple[Any, bytes]:
    """Read a header-then-chunks client stream into (header, bytes), enforcing sizes as it goes."""
    try:
        first = _well_formed(next(requests))
    except StopIteration:
        raise InvalidArgument("empty stream: the first message must be a header") from None
    if first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message of the stream must be a header")
    header = first.header
    declared = getattr(header, size_field)
    if declared < 0 or declared > limit:
        raise InvalidArgument(f"declared size {declared} bytes is outside [0, {limit}]")
    buf = bytearray()
    for req in requests:
        if _well_formed(req).WhichOneof("part") != "chunk":
            raise InvalidArgument("only chunks may follow the header")
        if len(req.chunk) > MAX_CHUNK:
            raise InvalidArgument(f"chunk of {len(req.chunk)} bytes exceeds {MAX_CHUNK}")
        buf += req.chunk
        if len(buf) > declared:
            raise InvalidArgument(f"stream carries more than the declared {declared} bytes")
    if len(buf) != declared:
        raise InvalidArgument(f"stream ended after {len(buf)} of the declared {declared} bytes")
    return header, bytes(buf)


class UploadSlots:
    """At most `limit` uploads are read and decoded at once; the others wait for a slot.

    An upload that waits has not read its stream, so gRPC holds at most one flow-control window of
    it (see `server.grpc_options`). One that waits longer than `wait_s` is refused with
    RESOURCE_EXHAUSTED, and the collaborator retries it with backoff: a waiting upload holds a
    worker thread, which GetTask, Join and health checks also need. Waiting rather than refusing at
    once matters: refusing at once cut bench/scale.py's ingest at 1,000 collaborators from ~100 to
    12 updates/s, the retries queueing for worker threads behind the long polls.
    """

    def __init__(self, limit: int, metrics: Metrics, wait_s: float = DEFAULT_UPLOAD_WAIT_S) -> None:
        if limit < 1:
            raise ValueError(f"max_concurrent_uploads must be at least 1, got {limit}")
        self.limit = limit
        self.wait_s = wait_s
        self.metrics = metrics
        self.active = 0
        self.waiting = 0
        self.peak = 0  # the most uploads ever in flight at once (tests check the bound with it)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def slot(self, is_active: Callable[[], bool]) -> Iterator[None]:
        """Hold a slot for the body; wait up to `wait_s` while the RPC is alive (`is_active`) if none is free."""
        with self._cond:
            if self.active >= self.limit:
                self.waiting += 1
                self.metrics.uploads_waiting.set(self.waiting)
                deadline = time.monotonic() + self.wait_s
                try:
                    while self.active >= self.limit:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            self.metrics.uploads_deferred.labels("refused").inc()
                            raise ResourceExhausted(f"all {self.limit} upload slots stayed busy for {self.wait_s:g} s; retry later")
                        if not is_active():
                            raise Unavailable("the upload ended while waiting for a slot")
                        self._cond.wait(min(remaining, 0.5))  # woken by notify; 0.5 s only to notice a cancelled RPC
                except BaseException:
                    if self.active < self.limit:
                        self._cond.notify()  # pass on a wake-up this waiter may have taken
                    raise
                finally:
                    self.waiting -= 1
                    self.metrics.uploads_waiting.set(self.waiting)
                self.metrics.uploads_deferred.labels("waited").inc()
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.metrics.uploads_in_flight.set(self.active)
        try:
            yield
        finally:
            with self._cond:
                self.active -= 1
                self.metrics.uploads_in_flight.set(self.active)
                self._cond.notify()


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(
        self,
        federation: Federation,
        *,
        mutual_tls: bool = False,
        max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
        upload_wait_s: float = DEFAULT_UPLOAD_WAIT_S,
    ) -> None:
        self.fed = federation
        self.mutual_tls = mutual_tls
        self.uploads = UploadSlots(max_concurrent_uploads, federation.metrics, upload_wait_s)

    def _identity(self, context: grpc.ServicerContext) -> str | None:
        """Under mTLS, the verified client certificate's common name; None without mTLS."""
        if not self.mutual_tls:
            return None
        names = context.auth_context().get("x509_common_name") or []
        if not names:
            raise Unauthenticated("a client certificate with a common name is required")
        return bytes(names[0]).decode("utf-8", "replace")

    def _as(self, context: grpc.ServicerContext, cred: pb.Credentials) -> tuple[str, str]:
        """(id, token) of the caller, refusing to act for an id other than the certificate's."""
        identity = self._identity(context)
        if identity is not None and cred.collaborator_id != identity:
            raise PermissionDenied(f"the client certificate {identity!r} cannot act as {cred.collaborator_id!r}")
        return cred.collaborator_id, cred.token

    @_mapped
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        r = self.fed.join(request.name, request.num_samples, identity=self._identity(context))
        return pb.JoinResponse(
            collaborator_id=r.collaborator_id,
            token=r.token,
            plan=pb.Plan(json=r.plan_json, sha256=r.plan_sha256),
            shard_index=r.shard_index,
            num_shards=r.num_shards,
        )

    @_mapped
    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.GetTaskResponse:
        task = self.fed.get_task(*self._as(context, request.credentials), request.wait_ms / 1000.0)
        resp = pb.GetTaskResponse(kind=pb.GetTaskResponse.Kind.Value(task.kind), round=task.round, message=task.message)
        if task.model is not None:
            resp.model.CopyFrom(payload_to_proto(task.model))
        return resp

    @_mapped
    def SubmitUpdate(self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext) -> pb.SubmitUpdateResponse:
        with self.uploads.slot(lambda: context.is_active()):
            header, blob = _assemble(request_iterator, "header", "payload_size", self.fed.max_update_bytes)
            metrics = dict(header.metrics)
            wire = self.fed.submit_update(*self._as(context, header.credentials), header.round, header.num_samples, blob, metrics)
        return pb.SubmitUpdateResponse(accepted=True, message="accepted", bytes_received=wire)

    @_mapped
    def UploadDecoder(self, request_iterator: Iterator[pb.UploadDecoderRequest], context: grpc.ServicerContext) -> pb.UploadDecoderResponse:
        with self.uploads.slot(lambda: context.is_active()):
            header, blob = _assemble(request_iterator, "header", "size", self.fed.max_decoder_bytes)
            architecture = MessageToDict(header.architecture, preserving_proto_field_name=True)
            n = self.fed.upload_decoder(*self._as(context, header.credentials), architecture, blob)
        return pb.UploadDecoderResponse(accepted=True, message="decoder accepted", bytes_received=n)

    @_mapped
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        self.fed.leave(*self._as(context, request.credentials))
        return pb.LeaveResponse()
