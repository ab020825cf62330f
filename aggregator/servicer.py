"""Thin gRPC servicer: protobuf in, a Federation call, protobuf out; domain errors become statuses.

Each handler converts its request with the pure functions of `fedsqueeze/wire.py`, calls one
Federation method, and converts the answer back; `_answer` maps the domain errors to their status
codes (`wire.STATUS_CODES`), so the Federation never sees protobuf or gRPC. Requests that are not
valid protobuf get INVALID_ARGUMENT (not gRPC's default INTERNAL): the handlers are registered with
deserializers that turn a parse error into a `Malformed` marker. Under mutual TLS the client
certificate's common name is the collaborator's identity: Join registers under it and every other
RPC must carry credentials for that id (PERMISSION_DENIED).

Uploads (SubmitUpdate, UploadDecoder) are streams: a header, then chunks. The header is checked
first (credentials, round, declared size against the plan's limits) before any chunk is read or an
upload slot taken; then the upload takes one of `max_concurrent_uploads` slots while it is read and
decoded (`upload_slots.py`), so the aggregator holds at most that many uploads in memory whatever
the number of collaborators. GetTask, Join, Leave and health checks take none.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict

from fedsqueeze.errors import FederationError, InvalidArgument, PermissionDenied, Unauthenticated
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc
from fedsqueeze.wire import payload_from_bytes, payload_to_proto, status_of

from .upload_slots import DEFAULT_MAX_CONCURRENT_UPLOADS, DEFAULT_UPLOAD_WAIT_S, UploadSlots

if TYPE_CHECKING:  # the CLI imports this module for its defaults without loading torch
    from .federation import Federation

log = logging.getLogger("fedsqueeze.aggregator")

F = TypeVar("F", bound=Callable[..., Any])

MAX_CHUNK = 4 << 20
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


def _answer(method: F) -> F:
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
            status = status_of(exc)
            context.abort(status, exc.message)
        except Exception as exc:  # noqa: BLE001 - the server must keep serving
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            if message is not None and status != grpc.StatusCode.OK:  # accepted ones: Federation's record_transfer
                self.fed.metrics.record_message(*message, status.name)

    return wrapper  # type: ignore[return-value]


def _header(requests: Iterator[Any]) -> Any:
    """The first message of an upload stream, which must be its header."""
    try:
        first = _well_formed(next(requests))
    except StopIteration:
        raise InvalidArgument("empty stream: the first message must be a header") from None
    if first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message of the stream must be a header")
    return first.header


def _chunks(requests: Iterator[Any], declared: int) -> bytes:
    """The rest of an upload stream: chunks adding up to exactly the declared size."""
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
    return bytes(buf)


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

    @_answer
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        r = self.fed.join(request.name, request.num_samples, identity=self._identity(context))
        return pb.JoinResponse(collaborator_id=r.collaborator_id, token=r.token, plan=pb.Plan(json=r.plan_json, sha256=r.plan_sha256),
                               shard_index=r.shard_index, num_shards=r.num_shards)  # fmt: skip

    @_answer
    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.GetTaskResponse:
        task = self.fed.get_task(*self._as(context, request.credentials), request.wait_ms / 1000.0)
        resp = pb.GetTaskResponse(kind=pb.GetTaskResponse.Kind.Value(task.kind), round=task.round, message=task.message)
        if task.model is not None:
            resp.model.CopyFrom(payload_to_proto(task.model))
        return resp

    @_answer
    def SubmitUpdate(self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext) -> pb.SubmitUpdateResponse:
        header = _header(request_iterator)
        who = self._as(context, header.credentials)
        self.fed.check_update(*who, header.round, header.num_samples, header.payload_size)
        with self.uploads.slot(lambda: context.is_active()):
            blob = _chunks(request_iterator, header.payload_size)
            wire = self.fed.submit_update(*who, header.round, header.num_samples, payload_from_bytes(blob), len(blob), dict(header.metrics))
        return pb.SubmitUpdateResponse(accepted=True, message="accepted", bytes_received=wire)

    @_answer
    def UploadDecoder(self, request_iterator: Iterator[pb.UploadDecoderRequest], context: grpc.ServicerContext) -> pb.UploadDecoderResponse:
        header = _header(request_iterator)
        who = self._as(context, header.credentials)
        architecture = MessageToDict(header.architecture, preserving_proto_field_name=True)
        self.fed.check_decoder(*who, architecture, header.size)
        with self.uploads.slot(lambda: context.is_active()):
            blob = _chunks(request_iterator, header.size)
            n = self.fed.upload_decoder(*who, architecture, blob)
        return pb.UploadDecoderResponse(accepted=True, message="decoder accepted", bytes_received=n)

    @_answer
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        self.fed.leave(*self._as(context, request.credentials))
        return pb.LeaveResponse()
