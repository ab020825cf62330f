"""Fuzzing the servicer: >= 10,000 malformed messages straight through FederationServicer (fast), a few
hundred more over real gRPC. Every one gets INVALID_ARGUMENT or a similar refusal (never OK, never
INTERNAL), RSS stays bounded, and a valid update is still accepted afterwards."""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import threading
from collections import Counter

import grpc
import numpy as np
import pytest
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedsqueeze.aggregator.federation import Federation
from fedsqueeze.aggregator.server import AggregatorServer
from fedsqueeze.aggregator.servicer import FederationServicer, _safe
from fedsqueeze.codecs.base import decode_varint
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc
from fedsqueeze.wire import payload_to_proto

REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
PLAN = {"rounds": 2, "collaborators": {"min": 1}, "round_timeout_s": 600, "uplink": {"chain": "fp16 | zstd"}}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code)

    def auth_context(self) -> dict:
        return {}


async def stream(parts: list):
    for part in parts:
        yield part


def submit(loop: asyncio.AbstractEventLoop, servicer: FederationServicer, parts: list, ctx: FakeContext):
    """The servicer's SubmitUpdate handler on an event loop, as the asyncio server runs it."""
    return loop.run_until_complete(servicer.SubmitUpdate(stream(parts), ctx))


class Cases:
    """Generators of hostile SubmitUpdate streams for one federation and one joined collaborator."""

    def __init__(self, fed: Federation, cred: pb.Credentials, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.cred = cred
        n = fed.layout.numel
        self.n, self.fp = n, fed.up_fingerprint
        good = fed.up_chain.encode(np.linspace(-1, 1, n, dtype=np.float32), fed.layout).data
        pos, self.sides = 1, []
        for _ in fed.up_chain.stages:
            length, pos = decode_varint(good, pos, "test")
            self.sides.append(good[pos : pos + length])
            pos += length
        self.good = good
        self.prefix = good[: len(good) - len(good[pos:])]  # version + side headers
        z = zstandard.ZstdCompressor(write_content_size=True)
        nan = np.zeros(n, np.float16)
        nan[self.rng.randrange(n)] = np.nan
        inf = np.zeros(n, np.float16)
        inf[0] = np.inf
        bomb = z.compress(bytes(64 << 20))  # 64 MiB of zeros in a few KiB
        unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(2 * n))
        liar = bytearray(z.compress(bytes(4 * n)))  # claims 4n bytes
        self.bodies = {
            "nan": self.prefix + z.compress(nan.tobytes()),
            "inf": self.prefix + z.compress(inf.tobytes()),
            "short shape": self.prefix + z.compress(np.zeros(n - 1, np.float16).tobytes()),
            "long shape": self.prefix + z.compress(np.zeros(n + 7, np.float16).tobytes()),
            "float32 not fp16": self.prefix + z.compress(np.zeros(n, np.float32).tobytes()),
            "zstd bomb": self.prefix + bomb,
            "zstd without size": self.prefix + unsized,
            "zstd size lie": self.prefix + bytes(liar),
            "zstd trailing": self.good + b"\x00" * 9,
            "wire version": b"\x07" + good[1:],
        }
        self.pickles = [
            pickle.dumps(o)
            for o in ({"w": [1.0] * 10}, np.zeros(10), list(range(50)), "x" * 100, (1, 2, {3: 4}))
        ]

    def payload(self, data: bytes, fingerprint: int | None = None, codec: str = "") -> bytes:
        msg = payload_to_proto(
            Payload(data=data, fingerprint=self.fp if fingerprint is None else fingerprint)
        )
        if codec:
            msg.codec = codec
        return msg.SerializeToString()

    def stream(self, blob: bytes, *, declared: int | None = None, round_number: int = 1, samples: int = 10, cred=None,
               chunk: int | None = None) -> list:  # fmt: skip
        hdr = pb.UpdateHeader(credentials=cred or self.cred, round=round_number, num_samples=samples,
                              payload_size=len(blob) if declared is None else declared)  # fmt: skip
        size = chunk or max(1, len(blob))
        return [pb.SubmitUpdateRequest(header=hdr)] + [
            pb.SubmitUpdateRequest(chunk=blob[i : i + size]) for i in range(0, len(blob), size)
        ]

    def one(self, i: int) -> tuple[str, list]:
        r = self.rng
        kind = i % 16
        if kind == 0:
            blob = r.randbytes(r.randrange(0, 4096))
            return "random bytes", self.stream(blob)
        if kind == 1:
            blob = self.payload(r.randbytes(r.randrange(1, 4096)))
            return "random data in a Payload", self.stream(blob)
        if kind == 2:
            return "pickled object", self.stream(r.choice(self.pickles))
        if kind == 3:
            blob = self.payload(self.good)
            cut = r.randrange(0, len(blob))
            return "truncated payload", self.stream(blob[:cut])
        if kind == 4:
            cut = r.randrange(0, len(self.good) - 1)
            return "truncated codec data", self.stream(self.payload(self.good[:cut]))
        if kind == 5:
            blob = self.payload(self.good)
            return "stream shorter than declared", self.stream(
                blob, declared=len(blob) + r.randrange(1, 1000), chunk=4096
            )
        if kind == 6:
            return "huge declared size", self.stream(
                b"", declared=r.choice([1 << 31, 1 << 40, (1 << 63) - 1, -1])
            )
        if kind == 7:
            name = r.choice(list(self.bodies))
            return name, self.stream(self.payload(self.bodies[name]))
        if kind == 8:
            fp = (self.fp ^ (1 << r.randrange(32))) & 0xFFFFFFFF
            return "wrong fingerprint", self.stream(self.payload(self.good, fp))
        if kind == 9:
            codec = r.choice(['{"id":"nope"}', "not json", '[{"id":"zstd","level":99}]', '"identity"', "[]"])
            return "foreign codec config", self.stream(self.payload(self.good, codec=codec))
        if kind == 10:
            header = bytearray(self.prefix)
            j = r.randrange(1, len(header))
            header[j] = (
                header[j] + r.randrange(1, 256)
            ) % 256 | 0x80  # varint continuation: the lengths run off
            return "corrupt side headers", self.stream(
                self.payload(bytes(header) + self.good[len(self.prefix) :])
            )
        if kind == 11:
            return "no header", [pb.SubmitUpdateRequest(chunk=r.randbytes(r.randrange(0, 64)))] * r.randrange(
                1, 4
            )
        if kind == 12:
            return "two headers", self.stream(self.payload(self.good))[:1] * 2
        if kind == 13:
            return "bad sample count", self.stream(self.payload(self.good), samples=r.choice([0, -5, 10**12]))
        if kind == 14:
            blob = r.randbytes(r.randrange(1, 300))
            return "unparsable protobuf", [_safe(pb.SubmitUpdateRequest.FromString)(b"\xff\xff\xff" + blob)]
        cred = pb.Credentials(collaborator_id=r.choice([self.cred.collaborator_id, "c9999-000000", "", "x" * 500]),
                              token=r.choice(["", "forged", self.cred.token + "x"]))  # fmt: skip
        return "bad credentials", self.stream(self.payload(self.good), cred=cred)


def open_round(fed: Federation) -> tuple[threading.Event, threading.Thread, pb.Credentials]:
    stop = threading.Event()
    t = threading.Thread(target=fed.run, args=(stop,), daemon=True)
    t.start()
    j = fed.join("fuzz", 10)
    task = fed.get_task(j.collaborator_id, j.token, 10)
    assert task.kind == "TRAIN" and task.round == 1
    return stop, t, pb.Credentials(collaborator_id=j.collaborator_id, token=j.token)


def test_ten_thousand_malformed_updates_through_the_servicer() -> None:
    fed = Federation(Plan.from_json(PLAN))
    stop, thread, cred = open_round(fed)
    servicer, ctx = FederationServicer(fed), FakeContext()
    loop = asyncio.new_event_loop()
    cases = Cases(fed, cred)
    codes: Counter = Counter()
    kinds: Counter = Counter()
    baseline = 0
    total = 10_400
    for i in range(total):
        if i == 400:
            baseline = rss_bytes()  # after warm-up (allocator pools, metrics series)
        kind, parts = cases.one(i)
        kinds[kind] += 1
        try:
            submit(loop, servicer, parts, ctx)
            codes["OK"] += 1
            raise AssertionError(f"case {i} ({kind}) was accepted")
        except Aborted as exc:
            codes[exc.code] += 1
            assert exc.code in REFUSALS, (i, kind, exc.code)
    growth = rss_bytes() - baseline
    print(f"\n{total} malformed updates: {dict((k.name if hasattr(k, 'name') else k, v) for k, v in codes.items())}; "
          f"RSS growth after warm-up {growth / 2**20:.1f} MiB; {len(kinds)} kinds")  # fmt: skip
    assert sum(codes.values()) == total >= 10_000
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 0.8 * total
    assert growth < 64 << 20
    # Still serving: the collaborator's real update is accepted (so nothing before it was).
    resp = submit(loop, servicer, cases.stream(cases.payload(cases.good)), ctx)
    assert resp.accepted
    loop.close()
    servicer.executor.shutdown()
    stop.set()
    thread.join(10)


@pytest.fixture
def server():
    srv = AggregatorServer(Plan.from_json(PLAN), host="127.0.0.1", port=0).start()
    yield srv
    srv.stop(grace=0.1)


def test_malformed_messages_over_grpc(server) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.FederationStub(channel)
    j = stub.Join(pb.JoinRequest(name="fuzz", num_samples=10))
    cred = pb.Credentials(collaborator_id=j.collaborator_id, token=j.token)
    assert stub.GetTask(pb.GetTaskRequest(credentials=cred, wait_ms=10_000)).round == 1
    cases = Cases(server.federation, cred, seed=1)
    raw_submit = channel.stream_unary("/fedsqueeze.v1.Federation/SubmitUpdate", request_serializer=lambda b: b,
                                      response_deserializer=pb.SubmitUpdateResponse.FromString)  # fmt: skip
    raw_join = channel.unary_unary("/fedsqueeze.v1.Federation/Join", request_serializer=lambda b: b,
                                   response_deserializer=pb.JoinResponse.FromString)  # fmt: skip
    codes: Counter = Counter()

    def call(fn) -> None:
        with pytest.raises(grpc.RpcError) as info:
            fn()
        codes[info.value.code()] += 1
        assert info.value.code() in REFUSALS, info.value

    rng = random.Random(2)
    for i in range(320):
        if i % 16 == 14:  # bytes that are no protobuf at all, as a stream and as a unary request
            garbage = b"\xff\xff\xff" + rng.randbytes(rng.randrange(1, 300))
            call(lambda g=garbage: raw_submit(iter([g]), timeout=10))
            call(lambda g=garbage: raw_join(g, timeout=10))
            continue
        _, parts = cases.one(i)
        call(lambda p=parts: stub.SubmitUpdate(iter(p), timeout=10))
    # Other RPCs with hostile fields.
    call(lambda: stub.Join(pb.JoinRequest(name="x" * 10_000), timeout=10))
    call(lambda: stub.Join(pb.JoinRequest(name="x", num_samples=-1), timeout=10))
    call(
        lambda: stub.GetTask(
            pb.GetTaskRequest(credentials=pb.Credentials(collaborator_id="x" * 1000, token="y")), timeout=10
        )
    )
    call(lambda: stub.Leave(pb.LeaveRequest(), timeout=10))
    assert sum(codes.values()) >= 300
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="fedsqueeze.v1.Federation")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    resp = stub.SubmitUpdate(iter(cases.stream(cases.payload(cases.good))), timeout=10)
    assert resp.accepted
    channel.close()
