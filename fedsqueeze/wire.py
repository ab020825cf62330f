"""The gRPC edge: pure conversions between domain objects and protobuf messages, and between
domain errors and gRPC status codes.

The servicer (aggregator/servicer.py) and the client (collaborator/transport.py) call these; no
other module imports protobuf or gRPC, so the federation and the collaborator's round step work
with `Payload`, `Layout` and `fedsqueeze.errors` only.
"""

from __future__ import annotations

import json

import grpc

from fedsqueeze.codecs import Layout
from fedsqueeze.codecs.layout import TensorInfo
from fedsqueeze.errors import (
    AlreadyExists,
    FailedPrecondition,
    FederationError,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from fedsqueeze.payload import Payload, json_chain
from fedsqueeze.v1 import fedsqueeze_pb2 as pb

# -- errors <-> status codes ----------------------------------------------------------------------
#: The domain error raised for each status the other side may answer with.
ERRORS: dict[grpc.StatusCode, type[FederationError]] = {
    grpc.StatusCode[cls.status]: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        FailedPrecondition,
        AlreadyExists,
        ResourceExhausted,
        Unavailable,
        Internal,
    )
}


def status_of(error: FederationError) -> grpc.StatusCode:
    """The status a domain error is answered with."""
    return grpc.StatusCode[error.status]


def error_from_status(code: grpc.StatusCode, details: str) -> FederationError:
    """The domain error for a status the other side answered with."""
    cls = ERRORS.get(code)
    return cls(details) if cls is not None else Internal(f"{code.name}: {details}")


# -- layouts and payloads -------------------------------------------------------------------------
def layout_to_proto(layout: Layout) -> pb.Layout:
    return pb.Layout(tensors=[pb.TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in layout])


def layout_from_proto(msg: pb.Layout) -> Layout:
    return Layout(
        tuple(TensorInfo(t.name, tuple(int(d) for d in t.shape), t.dtype or "float32") for t in msg.tensors)
    )


def payload_to_proto(p: Payload) -> pb.Payload:
    msg = pb.Payload(fingerprint=p.fingerprint, data=p.data)
    if p.chain is not None:
        msg.codec = json_chain(p.chain)
    if p.layout is not None:
        msg.layout.CopyFrom(layout_to_proto(p.layout))
    return msg


def payload_from_proto(msg: pb.Payload) -> Payload:
    """A received payload; InvalidArgument when its declarations do not parse."""
    chain = None
    if msg.codec:
        try:
            chain = json.loads(msg.codec)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"payload codec config is not JSON: {exc}") from exc
    try:
        layout = layout_from_proto(msg.layout) if msg.HasField("layout") else None
    except ValueError as exc:  # CodecError: a malformed declared layout
        raise InvalidArgument(f"payload layout is malformed: {exc}") from exc
    return Payload(data=msg.data, fingerprint=msg.fingerprint, chain=chain, layout=layout)


def payload_to_bytes(p: Payload) -> bytes:
    return payload_to_proto(p).SerializeToString()


def payload_from_bytes(blob: bytes) -> Payload:
    try:
        msg = pb.Payload.FromString(blob)
    except Exception as exc:  # protobuf's DecodeError
        raise InvalidArgument(f"payload is not a valid Payload message: {exc}") from exc
    return payload_from_proto(msg)
