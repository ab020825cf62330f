"""`raw` (alias `identity`): an array as little-endian bytes; integer symbols are bit-packed.

A chain appends it implicitly when its last stage yields an array, and inserts it before a
bytes-only stage such as zstd. Alone, it is the uncompressed fp32 baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import ArraySpec, BytesSpec, Codec, Data, Spec, StageState, register_codec
from .errors import CodecError


def symbol_bits(symbols: tuple[int, int]) -> int:
    """Bits per symbol for integers in [lo, hi]."""
    lo, hi = symbols
    return max(1, int(hi - lo).bit_length())


def _unsigned(width: int) -> type[np.unsignedinteger]:
    """The narrowest unsigned type of `width` bits: the packing's temporaries stay small."""
    return next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if np.iinfo(t).bits >= width)


def pack_symbols(values: np.ndarray, symbols: tuple[int, int]) -> bytes:
    """Pack integers in [lo, hi] at ceil(log2(hi - lo + 1)) bits each, MSB first."""
    width = symbol_bits(symbols)
    kind = _unsigned(width)
    offset = (values.astype(np.int64) - symbols[0]).astype(kind)
    if width == 8:
        return offset.tobytes()
    if width == 1:
        return np.packbits(offset).tobytes()
    if width in (2, 4):  # whole symbols per byte: shift and add, no bit array
        per_byte = 8 // width
        padded = np.zeros(-(-offset.size // per_byte) * per_byte, np.uint8)
        padded[: offset.size] = offset
        shifts = np.arange(8 - width, -1, -width, dtype=np.uint8)
        packed: np.ndarray = (padded.reshape(-1, per_byte) << shifts).sum(axis=1, dtype=np.uint8)
        return packed.tobytes()
    shifts = np.arange(width - 1, -1, -1, dtype=kind)
    bits = ((offset[:, None] >> shifts) & kind(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_symbols(data: bytes, count: int, symbols: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    width = symbol_bits(symbols)
    expected = (count * width + 7) // 8
    if len(data) != expected:
        raise CodecError(f"raw: {len(data)} bytes of packed symbols, expected {expected}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if width == 8:
        offset = buf.astype(np.int64)
    elif width == 1:
        offset = np.unpackbits(buf, count=count).astype(np.int64)
    elif width in (2, 4):
        shifts = np.arange(8 - width, -1, -width, dtype=np.uint8)
        mask = np.uint8((1 << width) - 1)
        offset = ((buf[:, None] >> shifts) & mask).reshape(-1)[:count].astype(np.int64)
    else:
        bits = np.unpackbits(buf, count=count * width).reshape(count, width).astype(np.int64)
        offset = bits @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    values = offset + symbols[0]
    if values.size and int(values.max()) > symbols[1]:
        raise CodecError(f"raw: packed symbol above the declared maximum {symbols[1]}")
    return values.astype(dtype)


@register_codec
@dataclass
class Raw(Codec):
    codec_id: ClassVar[str] = "raw"
    lossless: ClassVar[bool] = True
    output_kind: ClassVar[str] = "bytes"

    @staticmethod
    def serialized_size(spec: ArraySpec) -> int:
        if spec.symbols is not None:
            return (spec.count * symbol_bits(spec.symbols) + 7) // 8
        return spec.nbytes

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        if not isinstance(spec, ArraySpec):
            raise CodecError("raw needs an array input")
        arr = spec.check(x, "raw input")
        if spec.symbols is not None:
            return b"", pack_symbols(arr, spec.symbols)
        return b"", arr.astype(spec.dtype.newbyteorder("<"), copy=False).tobytes()

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        if side:
            raise CodecError("raw: unexpected header bytes")
        if not isinstance(spec, ArraySpec):
            raise CodecError("raw needs an array input")
        return BytesSpec(self.serialized_size(spec))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        if not isinstance(spec, ArraySpec) or not isinstance(y, bytes | bytearray | memoryview):
            raise CodecError("raw: expected bytes for an array spec")
        if spec.symbols is not None:
            return unpack_symbols(bytes(y), spec.count, spec.symbols, spec.dtype)
        if len(y) != spec.nbytes:
            raise CodecError(f"raw: {len(y)} bytes, expected {spec.nbytes} ({spec.count} x {spec.dtype})")
        return np.frombuffer(y, dtype=spec.dtype.newbyteorder("<")).astype(spec.dtype)


@register_codec
@dataclass
class Identity(Raw):
    """The uncompressed baseline: fp32 bytes, exactly as `raw`."""

    codec_id: ClassVar[str] = "identity"
