"""Client side: a Flower mod that decodes the server's compressed model and compresses the update.

    app = ClientApp(mods=[compression_mod])

The chains, the layout and the link counters come from the server (`CompressedStrategy`), with
the first message of each link. The mod

1. decodes the downlink record into the ArrayRecord the server's strategy sent (to within the
   chain's error) before the app's train / evaluate function sees the message;
2. on a train reply, codes the update, local weights minus the decoded model, with the uplink
   chain (error feedback included), and replaces the reply's ArrayRecord by the compressed one;
3. keeps the link's codec states (downlink receiver, uplink sender) and counters in
   `context.state["fedsqueeze"]`, committed only once the reply is built.

A message it cannot decode (a chain or layout other than the link's, a link out of step, bad
bytes) gets an error reply naming the problem, and the node forgets the link; the strategy starts
it again with the node's next message. Messages without fedsqueeze metadata pass through untouched.
"""

from __future__ import annotations

import copy
import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from fedsqueeze.codecs import Chain, CodecError, CodecState

from .records import (
    K_DOWNLINK,
    K_FINGERPRINT,
    K_LAYOUT,
    K_PRIOR,
    K_RECORD,
    K_SEQ,
    K_UP_SEQ,
    K_UPLINK,
    META,
    FlowerCodecError,
    RecordLayout,
    check_version,
    meta_int,
    meta_str,
    pack,
    unpack,
)

STATE = "fedsqueeze"  # ConfigRecord in context.state
ERROR_CODE = 2  # Flower's CLIENT_APP_RAISED_EXCEPTION: the reply's error when a message cannot be decoded

logger = logging.getLogger("flwr")

ClientAppCallable = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, ClientAppCallable], Message]
Prior = Callable[[Context], ArrayRecord]


@dataclass
class ClientLink:
    """One node's side of its link with the server, as kept in the context between messages."""

    record: str
    layout: RecordLayout
    downlink_config: str
    uplink_config: str
    down: CodecState  # downlink receiver state (residual history, ...)
    up: CodecState  # uplink sender state (error feedback, ...)
    down_seq: int = 0
    up_seq: int = 0

    @property
    def downlink(self) -> Chain:
        return Chain.from_config(json.loads(self.downlink_config))

    @property
    def uplink(self) -> Chain:
        return Chain.from_config(json.loads(self.uplink_config))

    def save(self, context: Context) -> None:
        context.state[STATE] = ConfigRecord(
            {
                K_RECORD: self.record,
                K_LAYOUT: self.layout.to_json(),
                K_DOWNLINK: self.downlink_config,
                K_UPLINK: self.uplink_config,
                "down-state": self.down.to_bytes(),
                "up-state": self.up.to_bytes(),
                K_SEQ: self.down_seq,
                K_UP_SEQ: self.up_seq,
            }
        )

    @classmethod
    def load(cls, context: Context) -> ClientLink | None:
        saved = context.state.get(STATE)
        if not isinstance(saved, ConfigRecord):
            return None
        return cls(
            record=meta_str(saved, K_RECORD),
            layout=RecordLayout.from_json(meta_str(saved, K_LAYOUT)),
            downlink_config=meta_str(saved, K_DOWNLINK),
            uplink_config=meta_str(saved, K_UPLINK),
            down=CodecState.from_bytes(_meta_bytes(saved, "down-state")),
            up=CodecState.from_bytes(_meta_bytes(saved, "up-state")),
            down_seq=meta_int(saved, K_SEQ),
            up_seq=meta_int(saved, K_UP_SEQ),
        )


def make_compression_mod(prior: Prior | None = None) -> Mod:
    """The client mod; `prior` builds the initial model when the server primes the downlink with it.

    With `CompressedStrategy(..., prior=initial_arrays)` the first download is coded against the
    initial model instead of zero; each node must then build the same initial model itself
    (same seed, same torch build), e.g. `make_compression_mod(lambda ctx: ArrayRecord(Net().state_dict()))`
    with a seeded `Net`. A different one is refused at the first message (its CRC travels)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return _handle(msg, context, call_next, prior)

    return mod


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: decode the downlink before the app sees it, compress the train reply's update."""
    return _handle(msg, context, call_next, None)


def _handle(msg: Message, context: Context, call_next: ClientAppCallable, prior: Prior | None) -> Message:
    if not msg.has_content() or not isinstance(msg.content.get(META), ConfigRecord):
        return call_next(msg, context)
    try:
        link, down_state, model = _open(msg, context, prior)
    except CodecError as exc:
        return _refuse(msg, context, exc)

    reply = call_next(msg, context)
    if reply.has_error():
        return reply  # nothing committed: the server restarts the link with this node's next message

    try:
        if msg.metadata.message_type.split(".")[0] == "train" and isinstance(
            reply.content.get(link.record), ArrayRecord
        ):
            _compress_reply(reply, link, model)
    except CodecError as exc:
        return _refuse(msg, context, exc)
    link.down = down_state
    link.down_seq += 1
    link.save(context)
    return reply


def _open(msg: Message, context: Context, prior: Prior | None) -> tuple[ClientLink, CodecState, np.ndarray]:
    """Decode the message's compressed record in place; the link and the receiver state to commit."""
    meta = msg.content[META]
    seq, up_seq = meta_int(meta, K_SEQ), meta_int(meta, K_UP_SEQ)
    if seq == 0:
        if up_seq != 0:
            raise FlowerCodecError(f"a new link must start with both counters at 0, got uplink {up_seq}")
        check_version(meta)
        link = _new_link(meta, context, prior)
    else:
        loaded = ClientLink.load(context)
        if loaded is None:
            raise FlowerCodecError(
                f"the server is at downlink message {seq} of this link but this node keeps no fedsqueeze state "
                "(a restarted node?); the server starts the link again"
            )
        if (loaded.down_seq, loaded.up_seq) != (seq, up_seq):
            raise FlowerCodecError(
                f"link out of step: this node has decoded {loaded.down_seq} downlink and sent {loaded.up_seq} uplink "
                f"messages, the server counts {seq} and {up_seq} (a reply was lost?); the server starts the link again"
            )
        link = loaded
    downlink = link.downlink
    expected = downlink.fingerprint(link.layout.tensors)
    got = meta_int(meta, K_FINGERPRINT)
    if got != expected:
        raise FlowerCodecError(
            f"downlink fingerprint {got:#010x} is not this link's {expected:#010x}: the server coded the model "
            f"with another chain or layout than the link's ({downlink}, {link.layout.tensors.numel} parameters)"
        )
    data, passthrough = unpack(msg.content.get(link.record))
    down_state = copy.deepcopy(link.down)
    model = downlink.decode(data, link.layout.tensors, down_state)
    content = RecordDict({k: v for k, v in msg.content.items() if k != META})
    content[link.record] = link.layout.assemble(model, passthrough)
    msg.content = content
    return link, down_state, model


def _new_link(meta: Any, context: Context, prior: Prior | None) -> ClientLink:
    layout = RecordLayout.from_json(meta_str(meta, K_LAYOUT))
    downlink_config, uplink_config = meta_str(meta, K_DOWNLINK), meta_str(meta, K_UPLINK)
    try:
        downlink = Chain.from_config(json.loads(downlink_config))
        Chain.from_config(json.loads(uplink_config))
    except json.JSONDecodeError as exc:
        raise FlowerCodecError(f"malformed chain config in the fedsqueeze metadata: {exc}") from exc
    link = ClientLink(
        meta_str(meta, K_RECORD), layout, downlink_config, uplink_config, CodecState(), CodecState()
    )
    prior_crc = meta_int(meta, K_PRIOR)
    if prior_crc != -1:
        if prior is None:
            raise FlowerCodecError(
                "the server primes the downlink with the initial model: build the mod with "
                "make_compression_mod(prior=...) returning that model"
            )
        reference = layout.flatten(prior(context))
        crc = zlib.crc32(reference.tobytes())
        if crc != prior_crc:
            raise FlowerCodecError(
                f"this node's initial model (CRC {crc:#010x}) is not the server's ({prior_crc:#010x}): both must "
                "build it with the same seed and the same torch version"
            )
        downlink.prime(link.down, reference)
    return link


def _compress_reply(reply: Message, link: ClientLink, model: np.ndarray) -> None:
    local = reply.content[link.record]
    assert isinstance(local, ArrayRecord)  # checked by the caller
    update = link.layout.flatten(local) - model
    up_state = copy.deepcopy(link.up)
    uplink = link.uplink
    encoded = uplink.encode(update, link.layout.tensors, up_state)
    reply.content[link.record] = pack(encoded.data, local, link.layout)
    reply.content[META] = ConfigRecord(
        {K_FINGERPRINT: uplink.fingerprint(link.layout.tensors), K_SEQ: link.up_seq}
    )
    link.up = up_state
    link.up_seq += 1


def _refuse(msg: Message, context: Context, exc: Exception) -> Message:
    """Forget the link and answer with an error reply naming the problem."""
    context.state.pop(STATE, None)
    reason = f"fedsqueeze: {exc}"
    logger.error("%s", reason)
    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)


def _meta_bytes(meta: Any, key: str) -> bytes:
    value = meta.get(key)
    if not isinstance(value, bytes):
        raise FlowerCodecError(f"fedsqueeze state field {key!r} must be bytes")
    return value
