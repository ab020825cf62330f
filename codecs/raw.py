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


def pack_symbols(values: np.ndarray, symbols: tuple[int, int]) -> bytes:
    """Pack integers in [lo, hi] at ceil(log2(hi - lo + 1)) bits each, MSB first."""
    width = symbol_bits(symbols)
    offset = (values.astype(np.int64) - symbols[0]).astype(np.uint64)
    if width == 8:
        return offset.astype(np.uint8).tobytes()
    if width == 1:
        return np.packbits(offset.astype(np.uint8)).tobytes()
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((offset[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_symbols(data: bytes, count: int, symbols: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    width = symbol_bits(symbols)
    expected = (count * width + 7) // 8
    if len(data) != expected:
        raise CodecError(f"raw: {len(data)} bytes of packed symbols, expected {expected}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if width == 8:
        offset = buf.astype(np.int64)
    else:
        bits = np.unpackbits(buf, count=count * width).reshape(count, width).astype(np.int64)
        offset = bits @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64)) if width > 1 else bits[:, 0]
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
