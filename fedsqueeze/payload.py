"""An encoded model or update as it travels: bytes, a fingerprint, and what the sender says it used.

A receiver decodes a payload only with its own chain for that direction (the plan's) and its own
layout. A payload may also declare the chain config and layout it was encoded with; when it does,
they must equal the receiver's, or it is refused with a message naming what differs. The
fingerprint (CRC-32 of chain config and layout) is always checked, so two sides that disagree get
an error instead of a silently corrupted model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedsqueeze.codecs import Chain, CodecError, Layout
from fedsqueeze.errors import InvalidArgument


@dataclass(frozen=True)
class Payload:
    data: bytes
    fingerprint: int
    # the codec chain config the sender declares (a list of codec configs); None: not declared
    chain: Any = None
    layout: Layout | None = None  # the layout the sender declares; None: not declared

    @property
    def wire_size(self) -> int:
        """Bytes of this payload on the wire: the length of its serialized `fedsqueeze.v1.Payload` message
        (proto3: fields at their default are not written). tests/test_wire.py checks it against protobuf."""
        size = 0
        if self.chain is not None:
            size += _length_delimited(len(json_chain(self.chain).encode()))
        if self.layout is not None:
            size += _length_delimited(_layout_size(self.layout))
        if self.fingerprint:
            size += 1 + 4  # fixed32
        if self.data:
            size += _length_delimited(len(self.data))
        return size

    def check(self, chain: Chain, layout: Layout, what: str) -> None:
        """Refuse (InvalidArgument) a payload this receiver must not decode with `chain` and `layout`."""
        if self.chain is not None:
            try:
                declared = Chain.from_config(self.chain)
            except CodecError as exc:
                raise InvalidArgument(
                    f"{what}: the payload declares a codec chain that is not valid: {exc}"
                ) from exc
            if declared.get_config() != chain.get_config():
                raise InvalidArgument(
                    f"{what}: the payload was encoded with '{declared}', but this federation's chain is '{chain}'"
                )
        if self.layout is not None and self.layout != layout:
            raise InvalidArgument(
                f"{what}: the payload's layout differs from this federation's model: {layout.first_difference(self.layout)}"
            )
        expected = chain.fingerprint(layout)
        if self.fingerprint != expected:
            raise InvalidArgument(
                f"{what}: payload fingerprint {self.fingerprint:08x} does not match this federation's codec chain and layout "
                f"({expected:08x}): sender and receiver disagree on '{chain}' or on the model"
            )


def json_chain(chain: Any) -> str:
    """The chain config as it is written into a payload."""
    return json.dumps(chain, separators=(",", ":"))


def _varint_size(value: int) -> int:
    if value < 0:
        return 10  # negative int64: two's complement, always ten bytes
    return max(1, (value.bit_length() + 6) // 7)


def _length_delimited(length: int) -> int:
    return 1 + _varint_size(length) + length


def _layout_size(layout: Layout) -> int:
    total = 0
    for t in layout:
        spec = 0
        if t.name:
            spec += _length_delimited(len(t.name.encode()))
        if t.shape:
            spec += _length_delimited(sum(_varint_size(d) for d in t.shape))  # packed repeated int64
        if t.dtype:
            spec += _length_delimited(len(t.dtype.encode()))
        total += _length_delimited(spec)
    return total
