"""`entropy`: adaptive arithmetic (range) coding of integer symbols, with `constriction`.

The model is adaptive, so no table travels: symbol counts start at 1/2 each (the
Krichevsky-Trofimov estimator) and are updated after every block; blocks start at 64 symbols and
double up to 64 Ki, so the coder learns fast on small messages and is vectorised on large ones.
The cost stays within a few percent of the empirical entropy n * H for n >= 10,000 symbols.
When the coded form would be larger than plain bit-packing (tiny or uniform messages), the
symbols are bit-packed instead; one header byte says which.

Input: an integer array whose spec declares its symbol range (a quantizer's output, stc's signs).
side: u8 mode (0: bit-packed, 1: range coded) | varint 32-bit words (mode 1);  body: bytes
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import constriction
import numpy as np

from .base import ArraySpec, BytesSpec, Codec, Data, SideReader, SideWriter, Spec, StageState, register_codec
from .errors import CodecError
from .raw import Raw

MAX_ALPHABET = 1 << 16
FIRST_BLOCK = 64
MAX_BLOCK = 1 << 16


def _symbol_spec(spec: Spec) -> ArraySpec:
    if not isinstance(spec, ArraySpec) or spec.symbols is None:
        raise CodecError("entropy codes integer symbols: put a quantizer (quantize, qsgd, sign, stc) before it")
    lo, hi = spec.symbols
    if hi - lo + 1 > MAX_ALPHABET:
        raise CodecError(f"entropy: alphabet of {hi - lo + 1} symbols exceeds {MAX_ALPHABET}")
    return spec


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    start, size = 0, FIRST_BLOCK
    while start < n:
        end = min(n, start + size)
        yield start, end
        start, size = end, min(size * 2, MAX_BLOCK)


def _models(alphabet: int, symbols: np.ndarray | None, n: int) -> Iterator[tuple[int, int, object]]:
    """(start, end, model) per block; counts advance with the symbols seen so far."""
    counts = np.full(alphabet, 0.5)
    for start, end in _blocks(n):
        model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
        yield start, end, model
        if symbols is not None:
            counts += np.bincount(symbols[start:end], minlength=alphabet)


@register_codec
@dataclass
class Entropy(Codec):
    codec_id: ClassVar[str] = "entropy"
    lossless: ClassVar[bool] = True
    output_kind: ClassVar[str] = "bytes"

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = _symbol_spec(spec)
        assert s.symbols is not None
        arr = s.check(x, "entropy input")
        lo, hi = s.symbols
        symbols = (arr.astype(np.int64) - lo).astype(np.int32)
        encoder = constriction.stream.queue.RangeEncoder()
        for start, end, model in _models(hi - lo + 1, symbols, symbols.size):
            encoder.encode(symbols[start:end], model)
        coded = encoder.get_compressed().astype("<u4").tobytes()
        packed_size = Raw.serialized_size(s)
        if len(coded) >= packed_size:
            _, packed = Raw().encode(arr, s, {})
            assert isinstance(packed, bytes)
            return b"\x00", packed
        return SideWriter().u8(1).varint(len(coded) // 4).getvalue(), coded

    def _words(self, side: bytes) -> int | None:
        """None for bit-packed symbols, else the number of 32-bit words of range-coded data."""
        r = SideReader(side, "entropy")
        mode = r.u8()
        if mode == 0:
            r.finish()
            return None
        if mode != 1:
            raise CodecError("entropy: unknown mode in header")
        words = r.varint()
        r.finish()
        return words

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        s = _symbol_spec(spec)
        words = self._words(side)
        limit = Raw.serialized_size(s)
        if words is not None and 4 * words > limit:
            raise CodecError(f"entropy: {4 * words} coded bytes exceed the bit-packed size {limit}")
        return BytesSpec(limit if words is None else 4 * words)

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState) -> Data:
        s = _symbol_spec(spec)
        assert s.symbols is not None
        data = bytes(y)
        words = self._words(side)
        if words is None:
            return Raw().decode(b"", data, s, {})
        if len(data) != 4 * words:
            raise CodecError(f"entropy: {len(data)} bytes of coded data, the header says {4 * words}")
        lo, hi = s.symbols
        coded = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        out = np.empty(s.count, dtype=np.int64)
        try:
            decoder = constriction.stream.queue.RangeDecoder(coded)
            counts = np.full(hi - lo + 1, 0.5)
            for start, end in _blocks(s.count):
                model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
                block = decoder.decode(model, end - start)
                out[start:end] = block
                counts += np.bincount(block, minlength=hi - lo + 1)
        except (ValueError, RuntimeError, AssertionError) as exc:
            raise CodecError(f"entropy: corrupt range-coded data: {exc}") from exc
        return (out + lo).astype(s.dtype)
