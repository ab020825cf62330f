"""`aggregator serve`: the gRPC server (asyncio) around a Federation, with health checks and SIGTERM.

The gRPC server runs on an asyncio event loop in a thread of its own, so waiting (long polls, upload
slots, slow or stalled streams) holds no thread; the Federation's work runs on the servicer's small
thread pool, and its round loop on one more thread. With a state directory the Federation restores
its checkpoint while it is constructed; the health service says NOT_SERVING until then and SERVING
once `start` runs. With `tls` the port serves TLS (mutual TLS when the config has a CA).

Memory stays O(model) however many collaborators upload at once: at most `max_concurrent_uploads`
uploads are read and decoded at a time (`upload_slots.UploadSlots`), the streams of the others stay
unread in gRPC with a small flow-control window each (`grpc_options`), and no message larger than a
chunk (1 MiB) is accepted, so what an unauthenticated stream can make the server buffer is bounded
too. `aggregator serve` also caps glibc's malloc arenas (`limit_malloc_arenas`): with one arena per
busy worker thread, freed update buffers stayed resident in each of them (bench/scale.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedsqueeze.metrics import Metrics
from fedsqueeze.plan import Plan
from fedsqueeze.report import RoundRecord
from fedsqueeze.tls import ServerTLS

from .admission import JoinPolicy
from .evaluation import Evaluator, InitialModel
from .federation import Federation
from .servicer import MAX_CHUNK, SERVICE, FederationServicer, StreamLimits, add_to_server
from .upload_slots import DEFAULT_MAX_CONCURRENT_UPLOADS, DEFAULT_UPLOAD_WAIT_S

log = logging.getLogger("fedsqueeze.aggregator")
SERVICE_NAME = SERVICE
# Initial HTTP/2 flow-control window of every stream: what gRPC buffers of an upload nobody reads yet.
STREAM_WINDOW = 16 << 10
T = TypeVar("T")


def grpc_options(max_send: int, max_receive: int = MAX_CHUNK + (64 << 10)) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_send),  # a download is one message: the whole encoded model
        ("grpc.max_receive_message_length", max_receive),  # uploads come in chunks
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        # Without these, BDP probing grows every stream's window towards the whole upload, so gRPC
        # would buffer each waiting upload in full: 1,000 uncompressed 2.3 MB updates took 2.6 GB.
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
    """A running aggregator: the gRPC server (its own event loop thread) plus the round thread."""

    def __init__(
        self,
        plan: Plan,
        *,
        host: str = "[::]",
        port: int = 0,
        report_path: Path | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        linger_s: float = 15.0,
        metrics: Metrics | None = None,
        state_dir: Path | None = None,
        tls: ServerTLS | None = None,
        max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
        upload_wait_s: float = DEFAULT_UPLOAD_WAIT_S,
        join_policy: JoinPolicy | None = None,
        stream_limits: StreamLimits | None = None,
        model: InitialModel | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        """`model`/`evaluator`: see `Federation` (None: the plan's built-in model and its held-out evaluation)."""
        if max_concurrent_uploads < 1:
            raise ValueError(f"max_concurrent_uploads must be at least 1, got {max_concurrent_uploads}")
        self.linger_s = linger_s
        # Restores the checkpoint from state_dir, if there is one (CheckpointError for another plan's).
        self.federation = Federation(plan, model=model, evaluator=evaluator, report_path=report_path, on_round=on_round,
                                     metrics=metrics, state_dir=state_dir, join_policy=join_policy)  # fmt: skip
        self.servicer = FederationServicer(
            self.federation, mutual_tls=tls is not None and tls.mutual,
            max_concurrent_uploads=max_concurrent_uploads, upload_wait_s=upload_wait_s, limits=stream_limits,
        )  # fmt: skip
        self.tls = tls
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="grpc", daemon=True)
        self._loop_thread.start()
        # A download is one message: the encoded model, or (shared autoencoder decoder mode) the decoder.
        max_send = max(MAX_CHUNK, 2 * self.federation.layout.raw_bytes, self.federation.max_decoder_bytes) + (
            1 << 20
        )
        try:
            self.port = self._on_loop(self._create(f"{host}:{port}", max_send))
        except BaseException:
            self._stop_loop()
            raise
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_rounds, name="rounds", daemon=True)

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _create(self, address: str, max_send: int) -> int:
        self.server = grpc.aio.server(options=grpc_options(max_send))
        self.health = health.aio.HealthServicer()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.servicer.bind(asyncio.get_running_loop())
        add_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = (
            self.server.add_secure_port(address, self.tls.credentials())
            if self.tls
            else self.server.add_insecure_port(address)
        )
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return int(port)

    async def _serving(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def start(self) -> AggregatorServer:
        self._on_loop(self.server.start())
        self._on_loop(self._serving(health_pb2.HealthCheckResponse.SERVING))
        self._thread.start()
        log.info("aggregator listening on port %d", self.port)
        return self

    def _run_rounds(self) -> None:
        try:
            self.federation.run(self.stop_event)
        except BaseException as exc:  # reported by wait()
            self.error = exc

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
        """Stop serving. Unless the federation is over, this is not its end: polling collaborators are
        told UNAVAILABLE (they retry), and a restart on the same state dir resumes the rounds."""
        self.stop_event.set()
        if self._loop_thread.is_alive():
            self._on_loop(self._serving(health_pb2.HealthCheckResponse.NOT_SERVING))
            self.loop.call_soon_threadsafe(self.servicer.stopping)
            self._on_loop(self.server.stop(grace))
        self._stop_loop()
        self.servicer.executor.shutdown(wait=False, cancel_futures=True)
        # The round thread may be evaluating (torch): let it finish, or the interpreter's exit kills it
        # inside torch's thread pool (std::terminate, exit 134).
        if self._thread.is_alive():
            self._thread.join(60)
        self.federation.report.write()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(10)

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            log.info("signal %d: shutting down", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
