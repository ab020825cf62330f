"""The gRPC service in-process: hostile and malformed input gets a status, and it keeps serving."""

from __future__ import annotations

import pickle
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedsqueeze.aggregator.server import AggregatorServer
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc
from fedsqueeze.wire import payload_to_proto


@pytest.fixture
def server():
    plan = Plan.from_json(
        {
            "rounds": 2,
            "collaborators": {"min": 1},
            "round_timeout_s": 30,
            "uplink": {"chain": "identity"},
            "downlink": {"chain": "identity"},
        }
    )
    srv = AggregatorServer(plan, host="127.0.0.1", port=0).start()
    yield srv
    srv.stop(grace=0.1)


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.FederationStub(channel)
    channel.close()


def submit(stub, parts):
    return stub.SubmitUpdate(iter(parts), timeout=10)


def header(cred, round_number, size, num_samples=10):
    return pb.SubmitUpdateRequest(
        header=pb.UpdateHeader(
            credentials=cred, round=round_number, num_samples=num_samples, payload_size=size
        )
    )


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def test_health_and_auth(server, stub) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    resp = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="fedsqueeze.v1.Federation")
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    bad = pb.Credentials(collaborator_id="nobody", token="x")
    assert (
        code_of(lambda: stub.GetTask(pb.GetTaskRequest(credentials=bad))) == grpc.StatusCode.UNAUTHENTICATED
    )
    joined = stub.Join(pb.JoinRequest(name="t"))
    wrong = pb.Credentials(collaborator_id=joined.collaborator_id, token="wrong")
    assert (
        code_of(lambda: stub.GetTask(pb.GetTaskRequest(credentials=wrong))) == grpc.StatusCode.UNAUTHENTICATED
    )
    missing = pb.Credentials(collaborator_id=joined.collaborator_id)
    assert code_of(lambda: submit(stub, [header(missing, 1, 0)])) == grpc.StatusCode.UNAUTHENTICATED


def test_hostile_updates_are_refused_and_the_server_keeps_serving(server, stub) -> None:
    joined = stub.Join(pb.JoinRequest(name="t", num_samples=10))
    cred = pb.Credentials(collaborator_id=joined.collaborator_id, token=joined.token)
    task = stub.GetTask(pb.GetTaskRequest(credentials=cred, wait_ms=10_000))
    assert task.kind == pb.GetTaskResponse.TRAIN and task.round == 1
    fed = server.federation
    fp = fed.up_fingerprint
    n = fed.layout.numel

    def payload(data: bytes, fingerprint: int = fp) -> bytes:
        return payload_to_proto(Payload(data=data, fingerprint=fingerprint)).SerializeToString()

    nan = np.zeros(n, np.float32)
    nan[5] = np.nan
    cases = {
        "no header": [pb.SubmitUpdateRequest(chunk=b"abc")],
        "empty stream": [],
        "random bytes": [header(cred, 1, 5), pb.SubmitUpdateRequest(chunk=b"\xff\x00\x13\x99\x01")],
        "pickled object": [
            header(cred, 1, len(p := pickle.dumps({"w": [1, 2]}))),
            pb.SubmitUpdateRequest(chunk=p),
        ],
        "short stream": [header(cred, 1, 100), pb.SubmitUpdateRequest(chunk=b"x" * 10)],
        "long stream": [header(cred, 1, 5), pb.SubmitUpdateRequest(chunk=b"x" * 10)],
        "huge declared size": [header(cred, 1, 1 << 40)],
        "wrong fingerprint": [
            header(cred, 1, len(q := payload(b"\x01\x00" + bytes(4 * n), fp ^ 1))),
            pb.SubmitUpdateRequest(chunk=q),
        ],
        "wrong shape": [
            header(cred, 1, len(q := payload(b"\x01\x00" + bytes(4 * n - 4)))),
            pb.SubmitUpdateRequest(chunk=q),
        ],
        "NaN": [
            header(cred, 1, len(q := payload(b"\x01\x00" + nan.tobytes()))),
            pb.SubmitUpdateRequest(chunk=q),
        ],
        "zero samples": [header(cred, 1, 0, num_samples=0)],
    }
    for name, parts in cases.items():
        code = code_of(lambda parts=parts: submit(stub, parts))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
    # Stale round and a valid update, then a duplicate.
    good = payload(b"\x01\x00" + np.zeros(n, np.float32).tobytes())
    assert (
        code_of(lambda: submit(stub, [header(cred, 7, len(good)), pb.SubmitUpdateRequest(chunk=good)]))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    resp = submit(stub, [header(cred, 1, len(good)), pb.SubmitUpdateRequest(chunk=good)])
    assert resp.accepted and resp.bytes_received == len(good)
    dup = code_of(lambda: submit(stub, [header(cred, 1, len(good)), pb.SubmitUpdateRequest(chunk=good)]))
    assert dup in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)
    # Still serving: round 2 arrives.
    task = stub.GetTask(pb.GetTaskRequest(credentials=cred, wait_ms=10_000))
    assert task.kind == pb.GetTaskResponse.TRAIN and task.round == 2


def test_decoder_upload_envelope(server, stub) -> None:
    joined = stub.Join(pb.JoinRequest(name="t"))
    cred = pb.Credentials(collaborator_id=joined.collaborator_id, token=joined.token)

    def upload(size: int, chunk: bytes):
        hdr = pb.UploadDecoderRequest(
            header=pb.DecoderHeader(
                credentials=cred, architecture=pb.DecoderArchitecture(kind="dense"), size=size
            )
        )
        return stub.UploadDecoder(iter([hdr, pb.UploadDecoderRequest(chunk=chunk)]), timeout=10)

    # This plan has no autoencoder stage: no decoder is expected, whatever its size, and it is refused from
    # its header, before a byte of it is read (tests/test_decoders.py: the size limits of a plan with one).
    for size, chunk in ((1 << 40, b"x"), (5, b"x" * 9), (3, b"xyz")):
        assert (
            code_of(lambda size=size, chunk=chunk: upload(size, chunk)) == grpc.StatusCode.FAILED_PRECONDITION
        )
    assert server.federation.max_decoder_bytes == 0


def test_sigterm_style_stop_ends_rounds(server) -> None:
    t = threading.Thread(target=server.wait)
    t.start()
    server.stop_event.set()
    t.join(10)
    assert not t.is_alive()
