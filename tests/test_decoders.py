"""Decoder uploads against a real in-process gRPC server: hostile decoders are refused, the server keeps serving."""

from __future__ import annotations

import pickle

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedsqueeze.aggregator.server import AggregatorServer
from fedsqueeze.codecs import CodecState
from fedsqueeze.codecs.autoencoder import decoder_to_bytes, find_stage
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc
from fedsqueeze.wire import payload_to_bytes

PLAN = {
    "rounds": 2,
    "collaborators": {"min": 2},
    "round_timeout_s": 30,
    "uplink": {"chain": "ae"},
    "prepass": {"enabled": True, "latent": 4},
}


@pytest.fixture
def server():
    srv = AggregatorServer(Plan.from_json(PLAN), host="127.0.0.1", port=0, linger_s=0.1).start()
    yield srv
    srv.stop(grace=0.1)


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.FederationStub(channel)
    channel.close()


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def upload(stub, cred, blob: bytes, arch: dict, size: int | None = None):
    sizes = {k: int(v) for k, v in arch["sizes"].items()}
    hdr = pb.DecoderHeader(credentials=cred, architecture=pb.DecoderArchitecture(kind=arch["kind"], sizes=sizes),
                           size=len(blob) if size is None else size)  # fmt: skip
    parts = [pb.UploadDecoderRequest(header=hdr)] + [
        pb.UploadDecoderRequest(chunk=blob[i : i + (1 << 20)]) for i in range(0, len(blob), 1 << 20)
    ]
    return stub.UploadDecoder(iter(parts), timeout=30)


def test_hostile_decoders_are_refused_and_a_good_one_is_bound_and_used(server, stub) -> None:
    fed = server.federation
    index, stage = find_stage(fed.up_chain)
    n = fed.layout.numel
    arch = stage.architecture(n)
    joined = [stub.Join(pb.JoinRequest(name=f"c{i}", num_samples=100)) for i in range(2)]
    a, b = (pb.Credentials(collaborator_id=j.collaborator_id, token=j.token) for j in joined)
    task = stub.GetTask(pb.GetTaskRequest(credentials=a, wait_ms=10_000))
    assert task.kind == pb.GetTaskResponse.PREPASS and task.model.data

    rng = np.random.default_rng(0)
    enc = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in stage.encoder_shapes(n).items()}
    dec = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in stage.decoder_shapes(n).items()}
    nan = {k: v.copy() for k, v in dec.items()}
    nan["dec.0.bias"][3] = np.nan
    big = decoder_to_bytes(dec, a.collaborator_id) + b"\x00" * (fed.prepass.max_bytes + 10)
    cases = {
        "pickled": (pickle.dumps(dec), arch),
        "extra key": (
            decoder_to_bytes({**dec, "dec.1.weight": np.zeros((2, 2), np.float32)}, a.collaborator_id),
            arch,
        ),
        "missing key": (decoder_to_bytes({"dec.0.weight": dec["dec.0.weight"]}, a.collaborator_id), arch),
        "wrong shape": (
            decoder_to_bytes({**dec, "dec.0.weight": np.zeros((n, 5), np.float32)}, a.collaborator_id),
            arch,
        ),
        "NaN": (decoder_to_bytes(nan, a.collaborator_id), arch),
        "size cap": (big, arch),
        "another collaborator's decoder": (decoder_to_bytes(dec, b.collaborator_id), arch),
        "unbound decoder": (decoder_to_bytes(dec), arch),
        "kind not allowed": (
            decoder_to_bytes(dec, a.collaborator_id),
            {"kind": "pickle", "sizes": arch["sizes"]},
        ),
        "sizes not the plan's": (
            decoder_to_bytes(dec, a.collaborator_id),
            {"kind": "dense", "sizes": {**arch["sizes"], "latent": 5}},
        ),
    }
    for name, (blob, arc) in cases.items():
        assert (
            code_of(lambda blob=blob, arc=arc: upload(stub, a, blob, arc)) == grpc.StatusCode.INVALID_ARGUMENT
        ), name
    # A's token with B's id: not B.
    forged = pb.Credentials(collaborator_id=b.collaborator_id, token=a.token)
    assert (
        code_of(lambda: upload(stub, forged, decoder_to_bytes(dec, b.collaborator_id), arch))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert not fed.prepass.installed

    good = decoder_to_bytes(dec, a.collaborator_id)
    assert upload(stub, a, good, arch).bytes_received == len(good)
    # no re-training in this plan
    assert code_of(lambda: upload(stub, a, good, arch)) == grpc.StatusCode.ALREADY_EXISTS
    assert np.array_equal(
        fed.links.link(a.collaborator_id).up.stage(index)["dec.0.weight"], dec["dec.0.weight"]
    )
    assert "dec.0.weight" not in fed.links.link(b.collaborator_id).up.stage(index)

    # Still serving.
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="fedsqueeze.v1.Federation")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()

    # B uploads its own; the rounds start, and A's AE-encoded update is decoded with A's decoder.
    task_b = stub.GetTask(pb.GetTaskRequest(credentials=b, wait_ms=10_000))
    assert task_b.kind == pb.GetTaskResponse.PREPASS
    upload(stub, b, decoder_to_bytes(dec, b.collaborator_id), arch)
    task = stub.GetTask(pb.GetTaskRequest(credentials=a, wait_ms=20_000))
    assert task.kind == pb.GetTaskResponse.TRAIN and task.round == 1
    tx = CodecState()
    tx.stage(index).update({**enc, **dec})
    data = fed.up_chain.encode((rng.standard_normal(n) * 0.01).astype(np.float32), fed.layout, tx).data
    blob = payload_to_bytes(Payload(data=data, fingerprint=fed.up_fingerprint))
    hdr = pb.SubmitUpdateRequest(
        header=pb.UpdateHeader(credentials=a, round=1, num_samples=10, payload_size=len(blob))
    )
    resp = stub.SubmitUpdate(iter([hdr, pb.SubmitUpdateRequest(chunk=blob)]), timeout=10)
    assert resp.accepted and resp.bytes_received == len(blob) < 130
    report = fed.report.to_json()
    assert report["prepass_bytes"]["decoder"] == 2 * len(good)
    assert report["prepass_bytes"]["down_wire"] > 0


def test_compressed_decoder_upload_is_decoded_checked_and_counted_as_it_travelled() -> None:
    """Also: a re-upload during the rounds counts, in the report's decoder bytes and in eq. 4 as run."""
    from fedsqueeze.aggregator import savings as sv
    from fedsqueeze.codecs.autoencoder import decoder_chain, validate_decoder

    config = "quantize:8,granularity=layer | entropy"
    plan = {**PLAN, "collaborators": {"min": 1},
            "prepass": {**PLAN["prepass"], "decoder_chain": config, "allow_retrain": True}}  # fmt: skip
    srv = AggregatorServer(Plan.from_json(plan), host="127.0.0.1", port=0, linger_s=0.1).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    try:
        stub = pb_grpc.FederationStub(channel)
        fed = srv.federation
        index, stage = find_stage(fed.up_chain)
        n = fed.layout.numel
        arch = stage.architecture(n)
        j = stub.Join(pb.JoinRequest(name="c0", num_samples=100))
        a = pb.Credentials(collaborator_id=j.collaborator_id, token=j.token)
        assert (
            stub.GetTask(pb.GetTaskRequest(credentials=a, wait_ms=10_000)).kind == pb.GetTaskResponse.PREPASS
        )
        rng = np.random.default_rng(0)
        dec = {
            k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in stage.decoder_shapes(n).items()
        }
        chain = decoder_chain(config)
        raw = decoder_to_bytes(dec, a.collaborator_id)
        assert code_of(lambda: upload(stub, a, raw, arch)) == grpc.StatusCode.INVALID_ARGUMENT
        other = decoder_to_bytes(dec, a.collaborator_id, decoder_chain("bf16 | zstd"))
        assert code_of(lambda: upload(stub, a, other, arch)) == grpc.StatusCode.INVALID_ARGUMENT
        blob = decoder_to_bytes(dec, a.collaborator_id, chain)
        assert len(blob) < len(raw) / 3
        assert upload(stub, a, blob, arch).bytes_received == len(blob)
        installed = fed.links.link(a.collaborator_id).up.stage(index)["dec.0.weight"]
        expected, _ = validate_decoder(blob, stage.decoder_shapes(n), len(blob), chain)
        assert np.array_equal(installed, expected["dec.0.weight"])
        assert not np.array_equal(installed, dec["dec.0.weight"])  # rounded by the decoder chain
        assert fed.report.prepass_bytes["decoder"] == len(blob)

        # Round 1: a re-trained decoder, then an update encoded with it.
        assert stub.GetTask(pb.GetTaskRequest(credentials=a, wait_ms=20_000)).kind == pb.GetTaskResponse.TRAIN
        dec2 = {k: v * 1.5 for k, v in dec.items()}
        blob2 = decoder_to_bytes(dec2, a.collaborator_id, chain)
        upload(stub, a, blob2, arch)
        enc = {
            k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in stage.encoder_shapes(n).items()
        }
        received2, _ = validate_decoder(blob2, stage.decoder_shapes(n), len(blob2), chain)
        tx = CodecState()
        tx.stage(index).update({**enc, **received2})
        data = fed.up_chain.encode((rng.standard_normal(n) * 0.01).astype(np.float32), fed.layout, tx).data
        update = payload_to_bytes(Payload(data=data, fingerprint=fed.up_fingerprint))
        hdr = pb.UpdateHeader(credentials=a, round=1, num_samples=10, payload_size=len(update))
        stub.SubmitUpdate(
            iter([pb.SubmitUpdateRequest(header=hdr), pb.SubmitUpdateRequest(chunk=update)]), timeout=10
        )
        task = stub.GetTask(pb.GetTaskRequest(credentials=a, wait_ms=20_000))
        assert task.kind == pb.GetTaskResponse.TRAIN and task.round == 2
        report = fed.report.to_json()
        run = sv.as_run(report)
        assert run["decoder_uploads"] == 2 and run["messages"] == 1
        assert run["decoder_bytes"] == len(blob) + len(blob2) and run["decoder_bytes_in_rounds"] == len(blob2)
        expected_sr = fed.layout.raw_bytes / (len(update) + len(blob) + len(blob2))
        assert run["savings_ratio"] == pytest.approx(expected_sr)
        assert report["summary"]["savings_ratio"] == pytest.approx(expected_sr)
        sizes, _ = sv.sizes_from_report(report)
        assert sizes.decoder == (len(blob) + len(blob2)) / 2  # eq. 4's D: the mean upload
    finally:
        channel.close()
        srv.stop(grace=0.1)
