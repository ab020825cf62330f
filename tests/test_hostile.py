"""Hostile peers against a real `aggregator serve` process, over gRPC (README "Hostile peers").

Each test is one attack from the security review and the defence that stops it: stalled and
unauthenticated streams, long-poll floods, decoder bytes on a plan without an autoencoder, slow
uploads holding slots, floods of tiny chunks, open joins, cancelled uploads (re-sent downloads,
weights and norms: tests/test_reliability.py, in-process).
The attacker is a grpc.aio client in this process; the aggregator and the legitimate collaborators
are processes, so health-check latency and the aggregator's RSS are measured from outside.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc

from .conftest import free_port, spawn

pytestmark = pytest.mark.slow

SERVICE = "fedsqueeze.v1.Federation"
# The RSS the aggregator may gain during the floods below (README "Hostile peers": bounded by the
# streams' header and chunk limits, not by what the attacker sends).
RSS_BOUND = 64 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def start_aggregator(
    tmp_path: Path, procs: list, plan: dict, *extra: str, verbose: bool = False
) -> tuple[int, object]:
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    port = free_port()
    agg = spawn(["fedsqueeze.aggregator", *(["-v"] if verbose else []), "serve", "--port", str(port), "--host", "127.0.0.1", "--plan", str(tmp_path / "plan.json"),
                 "--report", str(tmp_path / "report.json"), *extra], log=tmp_path / "agg.log")  # fmt: skip
    procs.append(agg)
    deadline = time.monotonic() + 120
    while "aggregator on port" not in (tmp_path / "agg.log").read_text():
        assert agg.poll() is None and time.monotonic() < deadline, (tmp_path / "agg.log").read_text()
        time.sleep(0.2)
    return port, agg


def collaborator(tmp_path: Path, port: int, i: int, *extra: str) -> object:
    return spawn(["fedsqueeze.collaborator", "join", "--server", f"127.0.0.1:{port}", "--no-progress", "--name", f"c{i}",
                  "--report", str(tmp_path / f"c{i}.json"), *extra], log=tmp_path / f"c{i}.log")  # fmt: skip


async def health_ms(channel: grpc.aio.Channel) -> float:
    t0 = time.perf_counter()
    resp = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
    )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    return (time.perf_counter() - t0) * 1000


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def never(first: object | None = None):
    """A request stream that sends `first` (or nothing) and then stalls."""
    if first is not None:
        yield first
    await asyncio.Event().wait()


# The attacker is a member too (it joins to get a token): it is selected and never submits, so its rounds
# close at the deadline with the legitimate collaborator's update (quorum 1).
PLAN = {"rounds": 3, "collaborators": {"min": 2, "max": 20, "join_timeout_s": 300}, "round_timeout_s": 10, "quorum": 1,
        "training": {"local_epochs": 1}, "keep_serving": True}  # fmt: skip


def test_stalled_streams_and_long_poll_floods_do_not_freeze_the_aggregator(
    tmp_path: Path, procs: list
) -> None:
    """Items 1, 2, 4: 200 streams that send nothing, 200 long polls of one identity (wait_ms 2^31-1) and
    streams stalled after a valid header: health answers in well under a second throughout, the flood
    is answered (polls past the identity's limit at once, stalled streams at their timeouts), and a
    legitimate collaborator started in the middle of it completes every round."""
    port, agg = start_aggregator(tmp_path, procs, PLAN)

    async def attack() -> dict[str, object]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.FederationStub(channel)
        joined = await stub.Join(pb.JoinRequest(name="mallory"))
        cred = pb.Credentials(collaborator_id=joined.collaborator_id, token=joined.token)
        before = rss(agg.pid)  # type: ignore[attr-defined]
        silent = [stub.SubmitUpdate(never()) for _ in range(200)]
        header = pb.SubmitUpdateRequest(
            header=pb.UpdateHeader(credentials=cred, round=1, num_samples=1, payload_size=1 << 20)
        )
        slow = [stub.SubmitUpdate(never(header)) for _ in range(8)]
        polls = [stub.GetTask(pb.GetTaskRequest(credentials=cred, wait_ms=2**31 - 1)) for _ in range(200)]
        await asyncio.sleep(2)
        legit = collaborator(tmp_path, port, 0)
        procs.append(legit)
        latencies = [await health_ms(channel)]
        while legit.poll() is None and len(latencies) < 600:  # type: ignore[attr-defined]
            await asyncio.sleep(0.5)
            latencies.append(await health_ms(channel))
        peak = rss(agg.pid)  # type: ignore[attr-defined]
        refused_polls = sum(p.done() for p in polls)
        silent_codes = [await code_of(s) for s in silent]
        for p in polls:
            p.cancel()
        for s in slow:
            s.cancel()
        await channel.close()
        return {
            "latencies": latencies,
            "growth": peak - before,
            "refused_polls": refused_polls,
            "silent": silent_codes,
        }

    out = asyncio.run(attack())
    legit_rc = procs[-1].wait(timeout=300)
    assert legit_rc == 0, (tmp_path / "c0.log").read_text()
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["status"] for r in report["rounds"]] == ["ok"] * 3
    latencies = out["latencies"]
    print(
        f"\nhealth during the flood: max {max(latencies):.0f} ms over {len(latencies)} checks; RSS +{out['growth'] / 2**20:.1f} MiB"
    )
    assert max(latencies) < 1000
    assert out["refused_polls"] >= 196  # only the identity's limit of long polls is held
    assert set(out["silent"]) == {grpc.StatusCode.UNAVAILABLE}  # no header within the header timeout: dropped
    assert out["growth"] < RSS_BOUND


def test_decoder_bytes_tiny_chunks_and_cancelled_uploads(tmp_path: Path, procs: list) -> None:
    """Items 3, 6, 12: a plan without an autoencoder takes no decoder bytes (refused from the header, before
    any is read: 8 streams of 64 MiB leave RSS where it was); a flood of empty or tiny chunks is refused at
    the first one; an upload the client cancels is one INFO line in the log, not an error."""
    port, agg = start_aggregator(tmp_path, procs, {**PLAN, "uplink": {"chain": "fp16 | zstd"}}, verbose=True)

    async def attack() -> dict[str, object]:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)]
        )
        stub = pb_grpc.FederationStub(channel)
        joined = await stub.Join(pb.JoinRequest(name="mallory"))
        cred = pb.Credentials(collaborator_id=joined.collaborator_id, token=joined.token)
        await stub.Join(pb.JoinRequest(name="accomplice"))  # the plan's two members: round 1 opens
        before = rss(agg.pid)  # type: ignore[attr-defined]

        async def decoder_bomb():
            yield pb.UploadDecoderRequest(header=pb.DecoderHeader(credentials=cred, architecture=pb.DecoderArchitecture(kind="dense"),
                                                                  size=64 << 20))  # fmt: skip
            for _ in range(64):
                yield pb.UploadDecoderRequest(chunk=bytes(1 << 20))

        async def patient_bomb():  # sends its header, then waits for the answer before pushing chunks
            yield pb.UploadDecoderRequest(header=pb.DecoderHeader(credentials=cred, architecture=pb.DecoderArchitecture(kind="dense"),
                                                                  size=64 << 20))  # fmt: skip
            await asyncio.sleep(30)

        t0 = time.perf_counter()
        bombs = await asyncio.gather(*(code_of(stub.UploadDecoder(decoder_bomb())) for _ in range(8)))
        bomb_seconds = time.perf_counter() - t0
        patient = await code_of(stub.UploadDecoder(patient_bomb()))
        growth = rss(agg.pid) - before  # type: ignore[attr-defined]
        task = await stub.GetTask(pb.GetTaskRequest(credentials=cred, wait_ms=30_000))
        assert task.kind == pb.GetTaskResponse.TRAIN

        async def empty_chunks():
            yield pb.SubmitUpdateRequest(
                header=pb.UpdateHeader(credentials=cred, round=1, num_samples=1, payload_size=1 << 16)
            )
            for _ in range(100_000):
                yield pb.SubmitUpdateRequest(chunk=b"")

        t0 = time.perf_counter()
        empties = await code_of(stub.SubmitUpdate(empty_chunks()))
        empty_seconds = time.perf_counter() - t0

        async def cancelled():
            yield pb.SubmitUpdateRequest(
                header=pb.UpdateHeader(credentials=cred, round=1, num_samples=1, payload_size=1 << 16)
            )
            yield pb.SubmitUpdateRequest(chunk=bytes(8 << 10))
            await asyncio.Event().wait()

        call = stub.SubmitUpdate(cancelled())
        await asyncio.sleep(1.0)
        call.cancel()
        await asyncio.sleep(1.0)
        await channel.close()
        return {
            "bombs": bombs,
            "patient": patient,
            "bomb_seconds": bomb_seconds,
            "growth": growth,
            "empties": empties,
            "empty_seconds": empty_seconds,
        }

    out = asyncio.run(attack())
    print(f"\n8 decoder bombs refused in {out['bomb_seconds']:.2f} s, RSS +{out['growth'] / 2**20:.1f} MiB; "
          f"100,000 empty chunks refused in {out['empty_seconds']:.2f} s")  # fmt: skip
    # Refused from the header; a client still pushing its chunks may see its own stream reset instead.
    assert out["patient"] == grpc.StatusCode.FAILED_PRECONDITION
    assert set(out["bombs"]) <= {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL}
    assert out["growth"] < RSS_BOUND
    assert out["empties"] == grpc.StatusCode.INVALID_ARGUMENT and out["empty_seconds"] < 5
    log = (tmp_path / "agg.log").read_text()
    assert "SubmitUpdate cancelled by the client" in log
    assert " ERROR " not in log and "Traceback" not in log, log


def test_joins_are_capped_and_admission_tokens_are_enforced(tmp_path: Path, procs: list) -> None:
    """Item 7: the member cap (collaborators.max) refuses the join past it; with enrollment tokens a Join
    without one is refused, and each token is one identity however often it joins."""
    (tmp_path / "tokens").write_text("# one per collaborator\nalpha-token-1\nbeta-token-2\n")
    port, _ = start_aggregator(tmp_path, procs, {**PLAN, "collaborators": {"min": 2, "max": 3, "join_timeout_s": 300}},
                               "--enrollment-file", str(tmp_path / "tokens"))  # fmt: skip

    async def attack() -> dict[str, object]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.FederationStub(channel)
        no_token = await code_of(stub.Join(pb.JoinRequest(name="x")))
        wrong = await code_of(stub.Join(pb.JoinRequest(name="x", join_token="guess")))
        ids = [
            (await stub.Join(pb.JoinRequest(name=f"a{i}", join_token="alpha-token-1"))).collaborator_id
            for i in range(50)
        ]
        beta = (await stub.Join(pb.JoinRequest(name="b", join_token="beta-token-2"))).collaborator_id
        await channel.close()
        return {"no_token": no_token, "wrong": wrong, "ids": ids, "beta": beta}

    out = asyncio.run(attack())
    assert out["no_token"] == out["wrong"] == grpc.StatusCode.UNAUTHENTICATED
    assert len(set(out["ids"])) == 1 and out["beta"] not in out["ids"]  # 50 joins, one identity

    # Open joins: at most collaborators.max members.
    capped = tmp_path / "open"
    capped.mkdir()
    port2, _ = start_aggregator(
        capped, procs, {**PLAN, "collaborators": {"min": 2, "max": 3, "join_timeout_s": 300}}
    )

    async def flood() -> list[grpc.StatusCode]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port2}")
        stub = pb_grpc.FederationStub(channel)
        codes = [await code_of(stub.Join(pb.JoinRequest(name=f"s{i}"))) for i in range(10)]
        await channel.close()
        return codes

    codes = asyncio.run(flood())
    assert codes[:3] == [grpc.StatusCode.OK] * 3 and set(codes[3:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
