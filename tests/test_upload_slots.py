"""The bound on uploads held in memory at once (`aggregator serve --max-concurrent-uploads`).

Uploads past the bound wait for a slot, or are refused with RESOURCE_EXHAUSTED and retried by the
collaborator; none is lost, and GetTask, Join and health checks are never held up by it. The
first uploads are parked inside `Federation.submit_update` (holding their slots) until the test
has seen the others wait or be refused, so nothing here depends on timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedsqueeze.aggregator.cli import main as aggregator_main
from fedsqueeze.aggregator.server import AggregatorServer
from fedsqueeze.codecs import CodecState
from fedsqueeze.collaborator.transport import FederationClient, retryable
from fedsqueeze.errors import FederationError
from fedsqueeze.metrics import Metrics
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan


def plan(collaborators: int) -> Plan:
    return Plan.from_json(
        {
            "rounds": 1,
            "collaborators": {"min": collaborators},
            "round_timeout_s": 120,
            "uplink": {"chain": "identity"},
            "downlink": {"chain": "identity"},
        }
    )


def until(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    """Wait for a state the test sets up (a generous limit against hangs, not a timing check)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {what}")
        time.sleep(0.01)


def park_updates(srv: AggregatorServer, parked: int) -> tuple[threading.Event, list[str]]:
    """The first `parked` updates stop inside submit_update (holding their slots) until the event is set."""
    release = threading.Event()
    entered: list[str] = []
    original = srv.federation.submit_update
    lock = threading.Lock()

    def gated(collaborator_id: str, *args: object, **kw: object) -> int:
        with lock:
            entered.append(collaborator_id)
            wait = len(entered) <= parked
        if wait:
            release.wait()
        return original(collaborator_id, *args, **kw)  # type: ignore[arg-type]

    srv.federation.submit_update = gated  # type: ignore[method-assign]
    return release, entered


@pytest.fixture
def clients() -> Iterator[list[FederationClient]]:
    made: list[FederationClient] = []
    yield made
    for c in made:
        c.close()


def start_round(srv: AggregatorServer, n: int, clients: list[FederationClient]) -> tuple[int, bytes]:
    """Join n collaborators and fetch round 1; returns (round, one encoded update)."""
    for i in range(n):
        client = FederationClient(f"127.0.0.1:{srv.port}", connect_timeout=30)
        client.join(f"c{i}", 10)
        clients.append(client)
    rounds = {c.get_task(wait_s=30).round for c in clients}
    assert rounds == {1}
    fed = srv.federation
    encoded = fed.up_chain.encode(np.full(fed.layout.numel, 0.01, np.float32), fed.layout, CodecState())
    return 1, encoded.data


def upload_all(
    srv: AggregatorServer, clients: list[FederationClient], data: bytes
) -> tuple[list[threading.Thread], dict[str, object]]:
    results: dict[str, object] = {}
    payload = Payload(data=data, fingerprint=srv.federation.up_fingerprint)

    def send(client: FederationClient) -> None:
        try:
            results[client.name] = client.submit_update(1, 10, payload, {})
        except Exception as exc:  # reported by the assertion on results
            results[client.name] = exc

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    return threads, results


def test_uploads_past_the_bound_wait_for_a_slot_and_none_is_lost(clients: list[FederationClient]) -> None:
    n, bound = 6, 2
    metrics = Metrics("aggregator")
    srv = AggregatorServer(
        plan(n), host="127.0.0.1", port=0, metrics=metrics, max_concurrent_uploads=bound
    ).start()
    try:
        _, data = start_round(srv, n, clients)
        release, entered = park_updates(srv, bound)
        slots = srv.servicer.uploads
        threads, results = upload_all(srv, clients, data)
        until(
            lambda: slots.active == bound and slots.waiting == n - bound,
            "2 uploads in their slots, 4 waiting",
        )
        get = metrics.registry.get_sample_value
        assert get("fedsqueeze_uploads_in_flight") == bound and get("fedsqueeze_uploads_waiting") == n - bound
        assert len(entered) == bound  # the waiting ones have not been read, let alone decoded
        # Long polls, joins and health checks are not held up by the full upload slots.
        assert clients[0].get_task(wait_s=0).kind == "TRAIN"
        extra = FederationClient(f"127.0.0.1:{srv.port}", connect_timeout=30)
        clients.append(extra)
        extra.join("late", 10)
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fedsqueeze.v1.Federation"), timeout=30
        )
        channel.close()
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        release.set()
        for t in threads:
            t.join(60)
        assert len(results) == n and all(isinstance(v, int) for v in results.values()), results
        until(lambda: len(srv.federation.report.rounds) == 1, "round 1 closed")
        record = srv.federation.report.rounds[0]
        assert (record.participants, record.dropped) == (n, 0)
        assert slots.peak == bound and slots.active == 0 and slots.waiting == 0
        assert get("fedsqueeze_uploads_deferred_total", {"outcome": "waited"}) == n - bound
        assert get("fedsqueeze_uploads_deferred_total", {"outcome": "refused"}) is None
        assert get("fedsqueeze_messages_total", {"direction": "up", "type": "update", "status": "OK"}) == n
    finally:
        srv.stop(grace=0.1)


def test_an_upload_refused_for_want_of_a_slot_is_retried_by_the_collaborator(
    clients: list[FederationClient],
) -> None:
    metrics = Metrics("aggregator")
    # upload_wait_s=0: an upload that finds the only slot taken is refused at once.
    srv = AggregatorServer(
        plan(2), host="127.0.0.1", port=0, metrics=metrics, max_concurrent_uploads=1, upload_wait_s=0
    ).start()
    try:
        _, data = start_round(srv, 2, clients)
        release, entered = park_updates(srv, 1)
        threads, results = upload_all(srv, clients, data)
        get = metrics.registry.get_sample_value
        refused_status = {"direction": "up", "type": "update", "status": "RESOURCE_EXHAUSTED"}
        # The status counter is bumped as the refusal is answered, just after the deferral counter.
        until(
            lambda: (
                (get("fedsqueeze_uploads_deferred_total", {"outcome": "refused"}) or 0) >= 2
                and (get("fedsqueeze_messages_total", refused_status) or 0) >= 2
            ),
            "the second upload refused twice",
        )
        assert len(entered) == 1 and srv.servicer.uploads.active == 1
        release.set()
        for t in threads:
            t.join(60)
        assert len(results) == 2 and all(isinstance(v, int) for v in results.values()), results
        until(lambda: len(srv.federation.report.rounds) == 1, "round 1 closed")
        assert srv.federation.report.rounds[0].participants == 2
        assert srv.servicer.uploads.peak == 1
    finally:
        srv.stop(grace=0.1)


def test_which_statuses_the_collaborator_retries() -> None:
    code = grpc.StatusCode
    assert retryable(code.RESOURCE_EXHAUSTED, "all 8 upload slots stayed busy for 30 s; retry later")
    assert retryable(code.UNAVAILABLE, "") and retryable(code.DEADLINE_EXCEEDED, "")
    assert not retryable(code.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 4)")
    assert not retryable(code.INVALID_ARGUMENT, "") and not retryable(code.ALREADY_EXISTS, "")
    # An aggregator stopping cancels its calls in flight: retried. A call this process cancelled is not.
    assert retryable(code.CANCELLED, "CANCELLED")
    assert not retryable(code.CANCELLED, "Locally cancelled by application!")
    assert not retryable(code.CANCELLED, "Channel closed!")


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_call_cancelled_by_a_stopping_aggregator_is_retried() -> None:
    """What a collaborator saw in a `docker restart` of the aggregator: CANCELLED with details
    "CANCELLED" when the old server's grace ended; it must retry, not exit."""
    client = FederationClient("127.0.0.1:1", connect_timeout=30)
    answers: list[Exception | str] = [_Status(grpc.StatusCode.CANCELLED, "CANCELLED"), "task"]

    def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    try:
        assert client._call("GetTask", call) == "task" and answers == []
        local = _Status(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        with pytest.raises(FederationError):
            client._call("GetTask", lambda: (_ for _ in ()).throw(local))
    finally:
        client.close()


def test_the_bound_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        aggregator_main(["serve", "--port", "0", "--max-concurrent-uploads", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --max-concurrent-uploads must be at least 1, got 0"
    ]
    with pytest.raises(ValueError, match="at least 1"):
        AggregatorServer(plan(1), host="127.0.0.1", port=0, max_concurrent_uploads=0)
