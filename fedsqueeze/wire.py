"""Pure conversions between domain objects and protobuf messages.

Domain code (federation, collaborator loop) never touches protobuf; the servicer and the
client call these functions at the edge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedsqueeze.codecs import CodecError, Layout, Pipeline
from fedsqueeze.codecs.layout import TensorInfo
from fedsqueeze.v1 import fedsqueeze_pb2 as pb


@dataclass
class WirePayload:
    """An encoded model or update as it travels."""

    data: bytes
    fingerprint: int
    codec: Any = None  # codec chain config, None: the plan's chain for this direction
    layout: Layout | None = None  # None: the plan's model layout

    def resolve(self, default_chain: Pipeline, default_layout: Layout) -> tuple[Pipeline, Layout]:
        """The chain and layout to decode with; refuses a payload whose fingerprint disagrees."""
        chain = default_chain if self.codec is None else Pipeline.from_config(self.codec)
        layout = default_layout if self.layout is None else self.layout
        if self.layout is not None and self.layout != default_layout:
            raise CodecError("payload layout differs from the federation's model layout")
        expected = chain.fingerprint(layout)
        if self.fingerprint != expected:
            raise CodecError(
                f"payload fingerprint {self.fingerprint:08x} does not match the expected codec chain and layout "
                f"({expected:08x}): sender and receiver disagree on '{chain}'"
            )
        return chain, layout


def layout_to_proto(layout: Layout) -> pb.Layout:
    return pb.Layout(tensors=[pb.TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in layout])


def layout_from_proto(msg: pb.Layout) -> Layout:
    return Layout(tuple(TensorInfo(t.name, tuple(int(d) for d in t.shape), t.dtype or "float32") for t in msg.tensors))


def payload_to_proto(p: WirePayload) -> pb.Payload:
    msg = pb.Payload(fingerprint=p.fingerprint, data=p.data)
    if p.codec is not None:
        msg.codec = json.dumps(p.codec, separators=(",", ":"))
    if p.layout is not None:
        msg.layout.CopyFrom(layout_to_proto(p.layout))
    return msg


def payload_from_proto(msg: pb.Payload) -> WirePayload:
    codec = None
    if msg.codec:
        try:
            codec = json.loads(msg.codec)
        except json.JSONDecodeError as exc:
            raise CodecError(f"payload codec config is not JSON: {exc}") from exc
    layout = layout_from_proto(msg.layout) if msg.HasField("layout") and msg.layout.tensors else None
    return WirePayload(data=msg.data, fingerprint=msg.fingerprint, codec=codec, layout=layout)


def payload_from_bytes(blob: bytes) -> WirePayload:
    try:
        msg = pb.Payload.FromString(blob)
    except Exception as exc:  # protobuf's DecodeError
        raise CodecError(f"payload is not a valid Payload message: {exc}") from exc
    return payload_from_proto(msg)


def payload_wire_size(p: WirePayload) -> int:
    """The bytes this payload takes on the wire: its serialized Payload message."""
    return payload_to_proto(p).ByteSize()
