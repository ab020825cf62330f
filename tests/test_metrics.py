"""Metrics in-process: registries per server, the collaborator label switch, message statuses, the endpoint, health."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest

from fedsqueeze.aggregator.server import AggregatorServer
from fedsqueeze.cli import main as fedsqueeze_main
from fedsqueeze.codecs import Chain
from fedsqueeze.codecs.layout import Layout
from fedsqueeze.metrics import Metrics, start_metrics_server
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan
from fedsqueeze.report import RoundRecord
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc
from fedsqueeze.wire import payload_to_proto


def test_registries_are_separate_and_the_collaborator_label_is_optional() -> None:
    a, b = Metrics("aggregator"), Metrics("aggregator", per_collaborator=False)
    a.record_transfer("up", "fp16 | zstd", "c1", raw=400, wire=150)
    a.record_update("up", "wire", "fp16 | zstd", "c2", 50)
    b.record_transfer("up", "fp16 | zstd", "c1", raw=400, wire=150)
    b.record_transfer("up", "fp16 | zstd", "c2", raw=400, wire=100)
    labels = {"direction": "up", "kind": "wire", "codec": "fp16 | zstd"}
    assert a.registry.get_sample_value("fedsqueeze_bytes_total", {**labels, "collaborator": "c1"}) == 150
    assert a.registry.get_sample_value("fedsqueeze_bytes_total", {**labels, "collaborator": "c2"}) == 50
    assert b.registry.get_sample_value("fedsqueeze_bytes_total", labels) == 250
    assert b.registry.get_sample_value("fedsqueeze_bytes_total", {**labels, "collaborator": "c1"}) is None
    assert (
        b.registry.get_sample_value(
            "fedsqueeze_bytes_total", {"direction": "up", "kind": "decoder", "codec": "fp16 | zstd"}
        )
        == 0
    )
    assert (
        b.registry.get_sample_value(
            "fedsqueeze_messages_total", {"direction": "up", "type": "update", "status": "OK"}
        )
        == 2
    )


def test_round_gauges_and_codec_histograms() -> None:
    m = Metrics("aggregator")
    rec = RoundRecord(round=3, accuracy=0.9, loss=0.3, participants=4, dropped=1, seconds=2.5,
                      bytes={"up_raw": 1000, "up_wire": 250, "down_raw": 1000, "down_wire": 500, "decoder": 250})  # fmt: skip
    m.record_round(rec)
    get = m.registry.get_sample_value
    assert get("fedsqueeze_round") == 3 and get("fedsqueeze_round_dropped") == 1
    assert get("fedsqueeze_round_duration_seconds") == 2.5 and get("fedsqueeze_model_accuracy_ratio") == 0.9
    assert get("fedsqueeze_round_compression_ratio", {"direction": "up"}) == 4.0
    assert get("fedsqueeze_cumulative_compression_ratio", {"direction": "total"}) == 2.0  # 2000 / (750 + 250)
    assert get("fedsqueeze_cumulative_savings_ratio") == 0.5
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    chain = Chain.parse("fp16 | zstd")
    encoded = chain.encode(x, _layout(x.size))
    codec = str(chain)
    m.record_encode("up", codec, encoded.stats)
    assert get("fedsqueeze_encode_seconds_count", {"direction": "up", "codec": codec}) == 1
    assert get("fedsqueeze_encode_stage_seconds_count", {"direction": "up", "stage": "fp16"}) == 1
    assert get("fedsqueeze_encode_stage_seconds_count", {"direction": "up", "stage": "zstd"}) == 1
    assert 0 < get("fedsqueeze_reconstruction_nmse_last", {"direction": "up", "codec": codec}) < 1e-6


def _layout(n: int) -> Layout:
    import torch

    from fedsqueeze.models import model_layout

    return model_layout(torch.nn.Linear(n, 1, bias=False))


def test_endpoint_serves_the_registry_on_a_free_port() -> None:
    m = Metrics("collaborator")
    m.record_transfer("down", "identity", "c9", raw=10, wire=12)
    server, port = start_metrics_server(0, m, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert (
            'fedsqueeze_bytes_total{codec="identity",collaborator="c9",direction="down",kind="wire"} 12.0'
            in text
        )
    finally:
        server.shutdown()


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
    srv = AggregatorServer(plan, host="127.0.0.1", port=0, metrics=Metrics("aggregator")).start()
    yield srv
    srv.stop(grace=0.1)


def test_messages_are_counted_by_status_and_health_answers(server, capsys) -> None:
    assert fedsqueeze_main(["health", "--server", f"127.0.0.1:{server.port}"]) == 0
    assert "SERVING" in capsys.readouterr().out
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.FederationStub(channel)
    joined = stub.Join(pb.JoinRequest(name="t", num_samples=10))
    cred = pb.Credentials(collaborator_id=joined.collaborator_id, token=joined.token)
    task = stub.GetTask(pb.GetTaskRequest(credentials=cred, wait_ms=10_000))
    fed = server.federation
    good = payload_to_proto(
        Payload(
            data=b"\x01\x00" + np.zeros(fed.layout.numel, np.float32).tobytes(),
            fingerprint=fed.up_fingerprint,
        )
    ).SerializeToString()

    def submit(round_number: int, blob: bytes) -> None:
        hdr = pb.SubmitUpdateRequest(
            header=pb.UpdateHeader(
                credentials=cred, round=round_number, num_samples=10, payload_size=len(blob)
            )
        )
        stub.SubmitUpdate(iter([hdr, pb.SubmitUpdateRequest(chunk=blob)]), timeout=10)

    for round_number, blob in ((task.round, b"\xff\x00\x13"), (task.round + 5, good), (task.round, good)):
        try:
            submit(round_number, blob)
        except grpc.RpcError:
            pass
    channel.close()
    get = fed.metrics.registry.get_sample_value
    status = {
        s: get("fedsqueeze_messages_total", {"direction": "up", "type": "update", "status": s})
        for s in ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION")
    }
    assert status == {"OK": 1, "INVALID_ARGUMENT": 1, "FAILED_PRECONDITION": 1}
    assert get("fedsqueeze_messages_total", {"direction": "down", "type": "model", "status": "OK"}) == 1
    labels = {"codec": "identity", "collaborator": joined.collaborator_id}
    assert get("fedsqueeze_bytes_total", {**labels, "direction": "up", "kind": "wire"}) == len(good)
    assert (
        get("fedsqueeze_bytes_total", {**labels, "direction": "down", "kind": "raw"}) == fed.layout.raw_bytes
    )
    # the others fail before decoding
    assert get("fedsqueeze_decode_seconds_count", {"direction": "up", "codec": "identity"}) == 1
    assert get("fedsqueeze_collaborators_active") == 1
    server.stop(grace=0.1)
    assert fedsqueeze_main(["health", "--server", f"127.0.0.1:{server.port}", "--timeout", "1"]) == 1
