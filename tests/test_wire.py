"""The wire boundary: the aggregator decodes only with the plan's chain and layout; pure to/from-proto conversions."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.aggregator.server import AggregatorServer
from fedsqueeze.codecs import Chain, CodecState, Layout
from fedsqueeze.codecs.layout import TensorInfo
from fedsqueeze.errors import FederationError, InvalidArgument, PermissionDenied, Unauthenticated
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc
from fedsqueeze.wire import (
    error_from_status,
    payload_from_bytes,
    payload_to_bytes,
    payload_to_proto,
    status_of,
)

COMPRESSED = {
    "rounds": 1,
    "collaborators": {"min": 1},
    "round_timeout_s": 30,
    "uplink": {"chain": "ef | topk:0.01 | quantize:4 | entropy"},
}


@pytest.fixture
def compressed():
    srv = AggregatorServer(Plan.from_json(COMPRESSED), host="127.0.0.1", port=0, linger_s=0.1).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    stub = pb_grpc.FederationStub(channel)
    joined = stub.Join(pb.JoinRequest(name="t", num_samples=10))
    cred = pb.Credentials(collaborator_id=joined.collaborator_id, token=joined.token)
    task = stub.GetTask(pb.GetTaskRequest(credentials=cred, wait_ms=20_000))
    assert task.kind == pb.GetTaskResponse.TRAIN and task.round == 1
    yield srv, stub, cred
    channel.close()
    srv.stop(grace=0.1)


def submit(stub, cred, blob: bytes):
    head = pb.SubmitUpdateRequest(
        header=pb.UpdateHeader(credentials=cred, round=1, num_samples=10, payload_size=len(blob))
    )
    return stub.SubmitUpdate(iter([head, pb.SubmitUpdateRequest(chunk=blob)]), timeout=30)


def refusal(stub, cred, blob: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, cred, blob)
    return info.value


def test_an_uncompressed_update_with_its_own_fingerprint_is_refused_by_a_compressed_plan(compressed) -> None:
    """A hostile collaborator cannot choose the codec the aggregator runs: `identity`, declared with a
    fingerprint that matches `identity`, is refused on a plan whose uplink is compressed."""
    srv, stub, cred = compressed
    layout = srv.federation.layout
    identity = Chain.parse("identity")
    data = identity.encode(np.zeros(layout.numel, np.float32), layout).data
    declared = payload_to_bytes(
        Payload(data=data, fingerprint=identity.fingerprint(layout), chain=identity.get_config())
    )
    err = refusal(stub, cred, declared)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "encoded with 'identity'" in err.details() and "ef:decay=1.0 | topk" in err.details()
    # the chain left out
    undeclared = payload_to_bytes(Payload(data=data, fingerprint=identity.fingerprint(layout)))
    err = refusal(stub, cred, undeclared)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "fingerprint" in err.details()
    assert srv.federation.report.to_json()["rounds"] == [] and not srv.federation.rounds.current.submitted


def test_a_payload_declaring_another_layout_is_refused_naming_the_tensor(compressed) -> None:
    srv, stub, cred = compressed
    fed = srv.federation
    layout = fed.layout
    first = layout.tensors[0]
    other = Layout((TensorInfo(first.name, (first.shape[0] + 1, *first.shape[1:])), *layout.tensors[1:]))
    chain = fed.up_chain
    data = chain.encode(np.zeros(other.numel, np.float32), other, CodecState()).data
    blob = payload_to_bytes(
        Payload(data=data, fingerprint=chain.fingerprint(other), chain=chain.get_config(), layout=other)
    )
    err = refusal(stub, cred, blob)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"tensor {first.name!r} has shape" in err.details()
    # The plan's own chain and layout, declared in full, are accepted.
    good = chain.encode(np.full(layout.numel, 0.01, np.float32), layout, CodecState()).data
    ok = payload_to_bytes(
        Payload(data=good, fingerprint=fed.up_fingerprint, chain=chain.get_config(), layout=layout)
    )
    assert submit(stub, cred, ok).accepted


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=300),
    fingerprint=st.integers(0, 2**32 - 1),
    declare_chain=st.booleans(),
    tensors=st.lists(
        st.tuples(st.text(max_size=12), st.lists(st.integers(0, 300), max_size=3)),
        max_size=4,
        unique_by=lambda t: t[0],
    ),
    declare_layout=st.booleans(),
)
def test_wire_size_is_the_serialized_length(
    data: bytes, fingerprint: int, declare_chain: bool, tensors: list, declare_layout: bool
) -> None:
    """`Payload.wire_size` (pure arithmetic, no protobuf) equals the serialized message's length."""
    layout = (
        Layout(tuple(TensorInfo(name, tuple(shape)) for name, shape in tensors)) if declare_layout else None
    )
    chain = [{"id": "topk", "fraction": 0.01}, {"id": "entropy"}] if declare_chain else None
    p = Payload(data=data, fingerprint=fingerprint, chain=chain, layout=layout)
    assert p.wire_size == len(payload_to_bytes(p)) == payload_to_proto(p).ByteSize()
    back = payload_from_bytes(payload_to_bytes(p))
    assert (
        back.data == data
        and back.fingerprint == fingerprint
        and back.chain == chain
        and back.layout == layout
    )


def test_malformed_payload_declarations_are_invalid_arguments() -> None:
    msg = pb.Payload(fingerprint=1, data=b"x", codec="{not json")
    with pytest.raises(InvalidArgument, match="not JSON"):
        payload_from_bytes(msg.SerializeToString())
    with pytest.raises(InvalidArgument, match="not a valid Payload"):
        payload_from_bytes(b"\xff\xff\xff")
    p = Payload(data=b"", fingerprint=0, chain=json.loads('[{"id": "nope"}]'))
    with pytest.raises(InvalidArgument, match="not valid"):
        p.check(Chain.parse("identity"), Layout.of({"w": np.zeros(3)}), "update rejected")


@pytest.mark.parametrize("error", [InvalidArgument("x"), Unauthenticated("x"), PermissionDenied("x")])
def test_errors_and_statuses_map_both_ways(error: FederationError) -> None:
    code = status_of(error)
    assert code.name == error.status
    back = error_from_status(code, "x")
    assert type(back) is type(error) and back.message == "x"
    assert error_from_status(grpc.StatusCode.DATA_LOSS, "y").message == "DATA_LOSS: y"
