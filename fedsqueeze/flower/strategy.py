"""Server side: a strategy wrapper that compresses what any Message-API strategy sends and receives.

    strategy = CompressedStrategy(FedAvg(...), uplink="ef | topk:0.01 | quantize:4 | entropy",
                                  downlink="residual | topk:0.05 | quantize:8 | entropy")
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=20)

Flower has no server-side mods, so, like Flower's `DifferentialPrivacyClientSideFixedClipping`,
this wraps a strategy (FedAvg, FedAdam, FedProx, ...):

- `configure_train` / `configure_evaluate`: the wrapped strategy builds its messages, then each
  one's ArrayRecord is coded with the downlink chain and this node's sender state (a residual
  chain sends only what changed since the node's last download);
- `aggregate_train`: each reply's compressed update is decoded with this node's uplink receiver
  state and added to the model the server sent that node, so the wrapped strategy gets the
  ArrayRecord of local weights it expects (FedAvg then averages them; downlink coding error does
  not reach the global model, as in fedsqueeze's own aggregator).

Every node has its own link: a downlink sender state, an uplink receiver state and two counters
that travel with each message, so both ends notice when they fall out of step. A state advances
only when the node's reply arrives; a node whose reply is missing, refused or an error starts a
new link with its next message (the whole model, coded from zero), and a reply that cannot be
decoded (another chain or layout: the fingerprint differs; bad bytes) becomes an error reply
that the wrapped strategy counts as a failure.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedsqueeze.codecs import Chain, CodecError, CodecState
from fedsqueeze.plan import DEFAULT_DOWNLINK, DEFAULT_UPLINK

from .records import (
    K_DOWNLINK,
    K_FINGERPRINT,
    K_LAYOUT,
    K_PRIOR,
    K_RECORD,
    K_SEQ,
    K_UP_SEQ,
    K_UPLINK,
    K_VERSION,
    META,
    PROTOCOL,
    FlowerCodecError,
    RecordLayout,
    meta_int,
    pack,
    unpack,
)

ERROR_CODE = 2  # the code of the error reply that replaces an update that cannot be decoded

logger = logging.getLogger("flwr")


@dataclass
class LinkBytes:
    """One direction of one round, in Flower's own measure (`ArrayRecord.count_bytes()`)."""

    messages: int = 0
    uncompressed: int = 0  # the wrapped strategy's / the app's ArrayRecords: what Flower would have sent
    compressed: int = 0  # the compressed ArrayRecords and their fedsqueeze metadata records: what it sends
    payload: int = 0  # the codec chain's bytes alone
    seconds: float = 0.0  # encoding and decoding on the server

    @property
    def ratio(self) -> float:
        return self.uncompressed / max(self.compressed, 1)


@dataclass
class RoundBytes:
    down: LinkBytes = field(default_factory=LinkBytes)
    up: LinkBytes = field(default_factory=LinkBytes)


@dataclass
class ServerLink:
    """The server's side of its link with one node."""

    layout: RecordLayout
    down: CodecState  # downlink sender state
    up: CodecState  # uplink receiver state
    down_seq: int = 0  # downlink messages the node has confirmed (by replying)
    up_seq: int = 0  # uplink messages decoded from the node


@dataclass
class _Pending:
    link: ServerLink
    message: Message  # as sent (an error reply in the node's name refers to it)
    down_state: CodecState  # the sender state once the node has this message
    sent: np.ndarray  # the model this message carried, exactly (the base of the node's update)


class CompressedStrategy(Strategy):
    """Compress a Message-API strategy's traffic with fedsqueeze codec chains, both ways.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap (FedAvg, FedAdam, ...).
    uplink, downlink : str or list
        Codec chains (`fedsqueeze codecs` lists the codecs); the defaults are fedsqueeze's.
        "identity" sends float32 unchanged.
    record_key : str or None
        The content key of the ArrayRecord to compress; by default the wrapped strategy's
        `arrayrecord_key` ("arrays" for Flower's strategies).
    prior : ArrayRecord or None
        The initial model, when every node can build it too: the downlink chain (which must start
        with `residual`) then codes each node's first download against it instead of zero. The
        nodes need `make_compression_mod(prior=...)`.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        uplink: Any = DEFAULT_UPLINK,
        downlink: Any = DEFAULT_DOWNLINK,
        record_key: str | None = None,
        prior: ArrayRecord | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.uplink = Chain.from_config(uplink)
        self.downlink = Chain.from_config(downlink)
        self.record_key: str = str(record_key or getattr(strategy, "arrayrecord_key", "arrays"))
        self._uplink_config = json.dumps(self.uplink.get_config(), separators=(",", ":"))
        self._downlink_config = json.dumps(self.downlink.get_config(), separators=(",", ":"))
        self._prior: tuple[RecordLayout, np.ndarray] | None = None
        if prior is not None:
            if not self.downlink.primable:
                raise CodecError(
                    f"a prior needs a downlink chain that starts with 'residual', got {self.downlink}"
                )
            prior_layout = RecordLayout.of(prior)
            self._prior = (prior_layout, prior_layout.flatten(prior))
        self.links: dict[int, ServerLink] = {}
        self._pending: dict[int, _Pending] = {}
        self.rounds: dict[int, RoundBytes] = {}

    def __repr__(self) -> str:
        return f"CompressedStrategy({self.strategy!r}, uplink={str(self.uplink)!r}, downlink={str(self.downlink)!r})"

    def summary(self) -> None:
        logger.info("\t├──> fedsqueeze compression:")
        logger.info("\t│\t├── uplink: %s", self.uplink)
        logger.info(
            "\t│\t├── downlink: %s%s",
            self.downlink,
            " (primed with the initial model)" if self._prior else "",
        )
        logger.info("\t│\t└── ArrayRecord key: '%s'", self.record_key)
        self.strategy.summary()

    # -- the wrapped strategy's four steps ------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        return self._compress(server_round, self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        decoded = self._receive(server_round, replies, train=True)
        stats = self._round(server_round)
        logger.info(
            "fedsqueeze: round %d downlink %d messages %s -> %s B (%.1fx), uplink %d messages %s -> %s B (%.1fx)",
            server_round, stats.down.messages, f"{stats.down.uncompressed:,}", f"{stats.down.compressed:,}", stats.down.ratio,
            stats.up.messages, f"{stats.up.uncompressed:,}", f"{stats.up.compressed:,}", stats.up.ratio,
        )  # fmt: skip
        return self.strategy.aggregate_train(server_round, decoded)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        return self._compress(
            server_round, self.strategy.configure_evaluate(server_round, arrays, config, grid)
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(
            server_round, self._receive(server_round, replies, train=False)
        )

    # -- downlink ---------------------------------------------------------------------------
    def _compress(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        # A node whose last message got no reply may or may not have decoded it: start again.
        for node in self._pending:
            self.links.pop(node, None)
        self._pending.clear()
        out = []
        for msg in messages:
            record = msg.content.get(self.record_key) if msg.has_content() else None
            if not isinstance(record, ArrayRecord):
                out.append(msg)
                continue
            node = msg.metadata.dst_node_id
            if node in self._pending:
                raise FlowerCodecError(
                    f"two messages for node {node} in one step: each node's link carries one message at a time"
                )
            start = time.perf_counter()
            layout = RecordLayout.of(record)
            link = self.links.get(node)
            if link is None or link.layout != layout:
                link = self._new_link(layout)
                self.links[node] = link
            model = layout.flatten(record)
            down_state = copy.deepcopy(link.down)
            encoded = self.downlink.encode(model, layout.tensors, down_state)
            meta: dict[str, Any] = {
                K_FINGERPRINT: self.downlink.fingerprint(layout.tensors),
                K_SEQ: link.down_seq,
                K_UP_SEQ: link.up_seq,
            }
            if link.down_seq == 0:  # a new link: what the node needs to build its side
                meta |= {
                    K_VERSION: PROTOCOL,
                    K_RECORD: self.record_key,
                    K_LAYOUT: layout.to_json(),
                    K_DOWNLINK: self._downlink_config,
                    K_UPLINK: self._uplink_config,
                    K_PRIOR: zlib.crc32(self._prior[1].tobytes()) if self._prior else -1,
                }
            compressed = pack(encoded.data, record, layout)
            meta_record = ConfigRecord(meta)
            # The wrapped strategy may share one RecordDict between its messages: give each its own.
            content = RecordDict({k: v for k, v in msg.content.items() if k != self.record_key})
            content[self.record_key] = compressed
            content[META] = meta_record
            msg.content = content
            self._pending[node] = _Pending(link, msg, down_state, model)
            stats = self._round(server_round).down
            stats.messages += 1
            stats.uncompressed += record.count_bytes()
            stats.compressed += compressed.count_bytes() + meta_record.count_bytes()
            stats.payload += len(encoded.data)
            stats.seconds += time.perf_counter() - start
            out.append(msg)
        return out

    def _new_link(self, layout: RecordLayout) -> ServerLink:
        link = ServerLink(layout, CodecState(), CodecState())
        if self._prior is not None:
            prior_layout, reference = self._prior
            if prior_layout.tensors != layout.tensors:
                raise FlowerCodecError(
                    "the prior's arrays (names, shapes) are not those of the model the strategy sends"
                )
            self.downlink.prime(link.down, reference)
        return link

    # -- uplink -----------------------------------------------------------------------------
    def _receive(self, server_round: int, replies: Iterable[Message], *, train: bool) -> list[Message]:
        out = []
        for reply in replies:
            node = reply.metadata.src_node_id
            pending = self._pending.pop(node, None)
            if pending is None:
                out.append(reply)  # a message that was not compressed
                continue
            if reply.has_error():
                self.links.pop(node, None)
                out.append(reply)
                continue
            try:
                up_state = self._decode_update(server_round, reply, pending) if train else None
            except CodecError as exc:
                self.links.pop(node, None)
                reason = f"fedsqueeze: update from node {node} refused: {exc}"
                logger.error("%s", reason)
                out.append(Message(Error(code=ERROR_CODE, reason=reason), reply_to=pending.message))
                continue
            link = pending.link
            link.down = pending.down_state
            link.down_seq += 1
            if up_state is not None:
                link.up = up_state
                link.up_seq += 1
            out.append(reply)
        return out

    def _decode_update(self, server_round: int, reply: Message, pending: _Pending) -> CodecState | None:
        """Replace the reply's compressed update by the node's weights; the receiver state to commit."""
        record = reply.content.get(self.record_key)
        meta = reply.content.get(META)
        if not isinstance(meta, ConfigRecord):
            if record is None:
                return None  # a train reply without arrays: nothing to decode
            raise FlowerCodecError(
                "the reply carries no fedsqueeze metadata: add compression_mod to the ClientApp's mods"
            )
        start = time.perf_counter()
        link = pending.link
        expected = self.uplink.fingerprint(link.layout.tensors)
        got = meta_int(meta, K_FINGERPRINT)
        if got != expected:
            raise FlowerCodecError(
                f"uplink fingerprint {got:#010x} is not this link's {expected:#010x}: the node coded its update "
                f"with another chain or layout than {self.uplink} on {link.layout.tensors.numel} parameters"
            )
        seq = meta_int(meta, K_SEQ)
        if seq != link.up_seq:
            raise FlowerCodecError(f"uplink message {seq} of the node, the server expects {link.up_seq}")
        if not isinstance(record, ArrayRecord):
            raise FlowerCodecError(
                f"the reply carries fedsqueeze metadata but no ArrayRecord {self.record_key!r}"
            )
        data, passthrough = unpack(record)
        up_state = copy.deepcopy(link.up)
        update = self.uplink.decode(data, link.layout.tensors, up_state)
        weights = link.layout.assemble(pending.sent + update, passthrough)
        content = RecordDict({k: v for k, v in reply.content.items() if k not in (META, self.record_key)})
        content[self.record_key] = weights
        stats = self._round(server_round).up
        stats.messages += 1
        stats.uncompressed += weights.count_bytes()
        stats.compressed += record.count_bytes() + meta.count_bytes()
        stats.payload += len(data)
        reply.content = content
        stats.seconds += time.perf_counter() - start
        return up_state

    def _round(self, server_round: int) -> RoundBytes:
        return self.rounds.setdefault(server_round, RoundBytes())
