"""`aggregator serve`: the gRPC server around a Federation, with health checks and SIGTERM.

With a state directory the Federation restores its checkpoint while it is constructed; the health
service says NOT_SERVING until then and SERVING once `start` runs. With `tls` the port serves TLS
(mutual TLS when the config has a CA).

Memory stays O(model) however many collaborators upload at once: at most `max_concurrent_uploads`
uploads are read and decoded at a time (`upload_slots.UploadSlots`), and the streams of the others stay
unread in gRPC with a small flow-control window each (`grpc_options`). Not `grpc.server(...,
maximum_concurrent_rpcs=N)`: that counts every RPC, so it would refuse the long polls of a large
federation's GetTask and health checks too. `aggregator serve` also caps glibc's malloc arenas
(`limit_malloc_arenas`): with one arena per busy worker thread, freed update buffers stayed
resident in each of them (about 100 MB more at 1,000 uncompressed updates, bench/scale.py).
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedsqueeze.metrics import Metrics
from fedsqueeze.plan import Plan
from fedsqueeze.report import RoundRecord
from fedsqueeze.tls import ServerTLS

from .federation import Federation
from .servicer import MAX_CHUNK, FederationServicer, add_to_server
from .upload_slots import DEFAULT_MAX_CONCURRENT_UPLOADS, DEFAULT_UPLOAD_WAIT_S

log = logging.getLogger("fedsqueeze.aggregator")
SERVICE_NAME = "fedsqueeze.v1.Federation"
# Initial HTTP/2 flow-control window of every stream: what gRPC buffers of an upload nobody reads yet.
STREAM_WINDOW = 16 << 10


def grpc_options(max_message: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        # Without these, BDP probing grows every stream's window towards the whole upload, so gRPC
        # would buffer each waiting upload in full: 1,000 uncompressed 2.3 MB updates took 2.6 GB.
        # A stream being read still gets a window of at least the message it waits for.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW),
    ]


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process (mallopt M_ARENA_MAX); False where there is no glibc.

    Call it before the server starts its threads: arenas are created per thread on demand.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_arena_max = -8  # malloc.h
    return bool(getattr(libc, "mallopt", lambda *_: 0)(m_arena_max, arenas))


class AggregatorServer:
    """A running aggregator: the gRPC server plus the round thread."""

    def __init__(
        self,
        plan: Plan,
        *,
        host: str = "[::]",
        port: int = 0,
        report_path: Path | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        max_workers: int = 32,
        linger_s: float = 15.0,
        metrics: Metrics | None = None,
        state_dir: Path | None = None,
        tls: ServerTLS | None = None,
        max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
        upload_wait_s: float = DEFAULT_UPLOAD_WAIT_S,
    ) -> None:
        if max_concurrent_uploads < 1:
            raise ValueError(f"max_concurrent_uploads must be at least 1, got {max_concurrent_uploads}")
        self.linger_s = linger_s
        self.health = health.HealthServicer()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # Restores the checkpoint from state_dir, if there is one (CheckpointError for another plan's).
        self.federation = Federation(plan, report_path=report_path, on_round=on_round, metrics=metrics, state_dir=state_dir)
        # Messages: the downlink model in one response, uplink chunks of at most MAX_CHUNK.
        max_message = max(MAX_CHUNK + (1 << 16), 2 * self.federation.layout.raw_bytes + (1 << 20))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=grpc_options(max_message))
        self.servicer = FederationServicer(
            self.federation, mutual_tls=tls is not None and tls.mutual,
            max_concurrent_uploads=max_concurrent_uploads, upload_wait_s=upload_wait_s,
        )
        add_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.tls = tls
        address = f"{host}:{port}"
        self.port = self.server.add_secure_port(address, tls.credentials()) if tls else self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_rounds, name="rounds", daemon=True)

    def start(self) -> AggregatorServer:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._thread.start()
        log.info("aggregator listening on port %d", self.port)
        return self

    def _run_rounds(self) -> None:
        try:
            self.federation.run(self.stop_event)
        except BaseException as exc:  # reported by wait()
            self.error = exc
            self.federation.shutdown()

    def wait(self, keep_serving: bool = False) -> None:
        """Block until the rounds are done (and, with keep_serving, until stopped)."""
        while self._thread.is_alive():
            self._thread.join(0.2)
        # Give polling collaborators a moment to hear DONE and leave.
        linger = time.monotonic() + self.linger_s
        while self.federation.active_ids() and time.monotonic() < linger and not self.stop_event.is_set():
            time.sleep(0.1)
        if keep_serving:
            self.stop_event.wait()

    def stop(self, grace: float = 3.0) -> None:
        self.stop_event.set()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.federation.shutdown()
        # Let collaborators that are polling learn that the federation is over.
        self.server.stop(grace).wait()
        self.federation.report.write()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            log.info("signal %d: shutting down", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
