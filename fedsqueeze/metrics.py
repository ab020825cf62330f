"""Prometheus metrics of the aggregator and the collaborators (prometheus-client).

Each process owns one `Metrics` object with its own `CollectorRegistry`, so several servers can
live in one process (tests) without sharing counters. `start_metrics_server` serves a registry
over HTTP (`--metrics-port`). The scrape jobs are expected to be called `fedsqueeze-aggregator`
and `fedsqueeze-collaborator` (deploy/prometheus.yml); the dashboard selects on them, because
both kinds of process expose the same byte counters, each from its own side.

Metrics (base units; a process exposes only what it can measure):

    fedsqueeze_bytes_total{direction, kind, codec, collaborator}   counter
        direction: up | down; kind: raw (fp32 size) | wire (serialized Payload) | decoder | resent (a message sent
        again to a peer that had it: not part of wire)
        codec: the chain, e.g. "fp16 | zstd"; collaborator: its id (optional, see below)
    fedsqueeze_messages_total{direction, type, status}             counter
        type: update | model | decoder; status: the gRPC status code name (OK, INVALID_ARGUMENT, ...)
    fedsqueeze_rounds_total{status}                                counter (ok | failed)
    fedsqueeze_round                                               gauge: last finished round
    fedsqueeze_round_duration_seconds                              gauge
    fedsqueeze_round_participants, fedsqueeze_round_dropped        gauges
    fedsqueeze_model_accuracy_ratio, fedsqueeze_model_loss         gauges (global model, held-out data)
    fedsqueeze_federated_metric{metric}                            gauge: the collaborators' evaluation of the
        last evaluated global model (weighted mean over their held-out samples), per metric they report
    fedsqueeze_round_compression_ratio{direction}                  gauge: raw / wire of the last round (up, down, total)
    fedsqueeze_cumulative_compression_ratio{direction}             gauge: raw / (wire + decoder) so far
    fedsqueeze_cumulative_savings_ratio                            gauge: 1 - (wire + decoder) / raw so far
    fedsqueeze_collaborators_active                                gauge
    fedsqueeze_uploads_in_flight                                   gauge: uploads being received and decoded (aggregator)
    fedsqueeze_uploads_waiting                                     gauge: uploads waiting for one of those slots
    fedsqueeze_uploads_deferred_total{outcome}                     counter: uploads that found every slot taken
        outcome: waited (got a slot later) | refused (none within the wait: RESOURCE_EXHAUSTED, retried)
    fedsqueeze_encode_seconds{direction, codec}                    histogram (whole chain)
    fedsqueeze_encode_stage_seconds{direction, stage}              histogram (one codec of the chain)
    fedsqueeze_decode_seconds{direction, codec}                    histogram
    fedsqueeze_reconstruction_nmse{direction, codec}               histogram: ||x - x_hat||^2 / ||x||^2
    fedsqueeze_reconstruction_nmse_last{direction, codec}          gauge
    fedsqueeze_local_training_seconds                              histogram (collaborator)
    fedsqueeze_local_loss                                          gauge (collaborator, last round)

The sender of a message knows the receiver's reconstruction exactly (EncodeStats.nmse), so the
NMSE of the uplink is reported by each collaborator and that of the downlink by the aggregator.

Cardinality: the `collaborator` label grows with the federation. `per_collaborator=False`
(`aggregator serve --no-metrics-per-collaborator`) drops it from the byte counters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("fedsqueeze.metrics")

AGGREGATOR_JOB = "fedsqueeze-aggregator"
COLLABORATOR_JOB = "fedsqueeze-collaborator"

TIME_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
TRAIN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
NMSE_BUCKETS = (1e-12, 1e-10, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)


def _ratio(raw: float, wire: float) -> float:
    return raw / wire if wire else 0.0


class Metrics:
    """The metrics of one process (role: aggregator or collaborator), in a registry of its own."""

    def __init__(
        self, role: str, *, per_collaborator: bool = True, registry: CollectorRegistry | None = None
    ) -> None:
        self.role = role
        self.per_collaborator = per_collaborator
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        byte_labels = (
            ("direction", "kind", "codec", "collaborator")
            if per_collaborator
            else ("direction", "kind", "codec")
        )
        self.bytes = Counter(
            "fedsqueeze_bytes",
            "Bytes exchanged: raw (fp32 size), wire (serialized Payload) or decoder uploads",
            byte_labels,
            registry=r,
        )
        self.messages = Counter(
            "fedsqueeze_messages",
            "Model messages by direction, type and gRPC status",
            ("direction", "type", "status"),
            registry=r,
        )
        self.rounds = Counter("fedsqueeze_rounds", "Finished rounds by status", ("status",), registry=r)
        self.round = Gauge(
            "fedsqueeze_round", "The last finished (aggregator) or trained (collaborator) round", registry=r
        )
        self.round_duration = Gauge(
            "fedsqueeze_round_duration_seconds", "Duration of the last round", registry=r
        )
        self.round_participants = Gauge(
            "fedsqueeze_round_participants", "Updates accepted in the last round", registry=r
        )
        self.round_dropped = Gauge(
            "fedsqueeze_round_dropped",
            "Selected collaborators whose update did not arrive in the last round",
            registry=r,
        )
        self.accuracy = Gauge(
            "fedsqueeze_model_accuracy_ratio", "Accuracy of the global model on held-out data", registry=r
        )
        self.federated = Gauge(
            "fedsqueeze_federated_metric",
            "The collaborators' evaluation of the last evaluated global model (weighted mean)",
            ("metric",),
            registry=r,
        )
        self.loss = Gauge("fedsqueeze_model_loss", "Loss of the global model on held-out data", registry=r)
        self.round_ratio = Gauge(
            "fedsqueeze_round_compression_ratio",
            "raw / wire bytes of the last round",
            ("direction",),
            registry=r,
        )
        self.cumulative_ratio = Gauge(
            "fedsqueeze_cumulative_compression_ratio",
            "raw / (wire + decoder) bytes since the start",
            ("direction",),
            registry=r,
        )
        self.savings = Gauge(
            "fedsqueeze_cumulative_savings_ratio",
            "1 - (wire + decoder) / raw bytes since the start, decoder uploads included",
            registry=r,
        )
        self.collaborators_active = Gauge(
            "fedsqueeze_collaborators_active", "Collaborators that joined and have not left", registry=r
        )
        self.uploads_in_flight = Gauge(
            "fedsqueeze_uploads_in_flight",
            "Uploads (updates, decoders) being received and decoded now",
            registry=r,
        )
        self.uploads_waiting = Gauge(
            "fedsqueeze_uploads_waiting", "Uploads waiting for a slot (--max-concurrent-uploads)", registry=r
        )
        self.uploads_deferred = Counter(
            "fedsqueeze_uploads_deferred",
            "Uploads that found every slot taken: got one later (waited) or were refused with RESOURCE_EXHAUSTED",
            ("outcome",),
            registry=r,
        )
        self.encode_seconds = Histogram(
            "fedsqueeze_encode_seconds",
            "Time to encode one message with the whole chain",
            ("direction", "codec"),
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.encode_stage_seconds = Histogram(
            "fedsqueeze_encode_stage_seconds",
            "Time of one codec of the chain encoding one message",
            ("direction", "stage"),
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "fedsqueeze_decode_seconds",
            "Time to decode one message with the whole chain",
            ("direction", "codec"),
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.nmse = Histogram(
            "fedsqueeze_reconstruction_nmse",
            "Normalised reconstruction error ||x - x_hat||^2 / ||x||^2 per message",
            ("direction", "codec"),
            buckets=NMSE_BUCKETS,
            registry=r,
        )
        self.nmse_last = Gauge(
            "fedsqueeze_reconstruction_nmse_last",
            "NMSE of the last message",
            ("direction", "codec"),
            registry=r,
        )
        self.train_seconds = Histogram(
            "fedsqueeze_local_training_seconds",
            "Local training time per round",
            buckets=TRAIN_BUCKETS,
            registry=r,
        )
        self.local_loss = Gauge("fedsqueeze_local_loss", "Training loss of the last local round", registry=r)
        self._cumulative: dict[str, int] = dict.fromkeys(
            ("up_raw", "up_wire", "down_raw", "down_wire", "decoder"), 0
        )

    # -- bytes and messages --------------------------------------------------------------------------
    def _bytes(self, direction: str, kind: str, codec: str, collaborator: str) -> Any:
        if self.per_collaborator:
            return self.bytes.labels(direction, kind, codec, collaborator)
        return self.bytes.labels(direction, kind, codec)

    def record_update(self, direction: str, kind: str, codec: str, collaborator: str, nbytes: int) -> None:
        """Count `nbytes` of one kind (raw, wire, decoder) travelling in one direction (up, down)."""
        self._bytes(direction, kind, codec, collaborator).inc(nbytes)

    def record_transfer(
        self, direction: str, codec: str, collaborator: str, *, raw: int, wire: int, status: str = "OK"
    ) -> None:
        """One model message that travelled: its raw and wire bytes, and the message itself."""
        self._bytes(direction, "raw", codec, collaborator).inc(raw)
        self._bytes(direction, "wire", codec, collaborator).inc(wire)
        if direction == "up":
            self._bytes("up", "decoder", codec, collaborator)  # exists (at 0) before any decoder upload
        self.messages.labels(direction, "update" if direction == "up" else "model", status).inc()

    def record_resent(self, direction: str, codec: str, collaborator: str, wire: int) -> None:
        """A message sent again to a peer that already had it (kind `resent`: not part of the `wire` totals)."""
        self._bytes(direction, "resent", codec, collaborator).inc(wire)
        self.messages.labels(direction, "update" if direction == "up" else "model", "RESENT").inc()

    def record_decoder(self, codec: str, collaborator: str, nbytes: int) -> None:
        """A decoder upload (autoencoder stages): its bytes count against the savings."""
        self._bytes("up", "decoder", codec, collaborator).inc(nbytes)
        self.messages.labels("up", "decoder", "OK").inc()

    def record_message(self, direction: str, type_: str, status: str) -> None:
        self.messages.labels(direction, type_, status).inc()

    # -- codec performance ---------------------------------------------------------------------------
    def record_encode(self, direction: str, codec: str, stats: Any) -> None:
        """From a chain's EncodeStats: time, time per stage, and the receiver's reconstruction error."""
        self.encode_seconds.labels(direction, codec).observe(stats.seconds)
        for key, seconds in stats.stage_seconds.items():
            self.encode_stage_seconds.labels(direction, key.partition(":")[2] or key).observe(seconds)
        self.nmse.labels(direction, codec).observe(stats.nmse)
        self.nmse_last.labels(direction, codec).set(stats.nmse)

    def record_decode(self, direction: str, codec: str, seconds: float) -> None:
        self.decode_seconds.labels(direction, codec).observe(seconds)

    # -- rounds ----------------------------------------------------------------------------------------
    def record_evaluation(self, metrics: Mapping[str, float]) -> None:
        """A global model's federated evaluation (weighted means, and how many collaborators and samples)."""
        for name, value in metrics.items():
            self.federated.labels(name).set(value)

    def record_round(self, record: Any, totals: Mapping[str, Any] | None = None) -> None:
        """The aggregator's per-round gauges from a RoundRecord; `totals` is the run report's summary."""
        b = record.bytes
        self.rounds.labels("ok" if record.ok else "failed").inc()
        self.round.set(record.round)
        self.round_duration.set(record.seconds)
        self.round_participants.set(record.participants)
        self.round_dropped.set(record.dropped)
        if record.accuracy is not None:
            self.accuracy.set(record.accuracy)
        if record.loss is not None:
            self.loss.set(record.loss)
        self.round_ratio.labels("up").set(_ratio(b["up_raw"], b["up_wire"]))
        self.round_ratio.labels("down").set(_ratio(b["down_raw"], b["down_wire"]))
        self.round_ratio.labels("total").set(
            _ratio(b["up_raw"] + b["down_raw"], b["up_wire"] + b["down_wire"] + b.get("decoder", 0))
        )
        if totals is None:
            for k in self._cumulative:
                self._cumulative[k] += int(b.get(k, 0))
            totals = self._cumulative
        raw = totals["up_raw"] + totals["down_raw"]
        sent = totals["up_wire"] + totals["down_wire"] + totals["decoder"]
        self.cumulative_ratio.labels("up").set(
            _ratio(totals["up_raw"], totals["up_wire"] + totals["decoder"])
        )
        self.cumulative_ratio.labels("down").set(_ratio(totals["down_raw"], totals["down_wire"]))
        self.cumulative_ratio.labels("total").set(_ratio(raw, sent))
        self.savings.set(1.0 - sent / raw if raw else 0.0)

    def record_training(self, round_number: int, seconds: float, loss: float | None) -> None:
        """A collaborator's local round."""
        self.round.set(round_number)
        self.train_seconds.observe(seconds)
        if loss is not None:
            self.local_loss.set(loss)

    def track_active(self, count: Callable[[], int]) -> None:
        self.collaborators_active.set_function(lambda: float(count()))


def start_metrics_server(port: int, metrics: Metrics, host: str = "0.0.0.0") -> tuple[Any, int]:
    """Serve `metrics` at http://HOST:PORT/metrics in a daemon thread; returns (server, bound port).

    Port 0 picks a free port. Call `server.shutdown()` to stop it.
    """
    host = host.strip("[]") or "0.0.0.0"
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return server, bound
