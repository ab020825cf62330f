"""`entropy`: adaptive arithmetic (range) coding of integer symbols, with `constriction`.

The model is adaptive, so no frequency table travels: symbol counts start at 1/2 each (the
Krichevsky-Trofimov estimator) and are updated after every block. Blocks start at one symbol and
grow by half up to 64 Ki, so the model learns almost as fast as a per-symbol update on small
messages while the work stays vectorised (one model per block) on large ones. The alphabet is
narrowed to the range of symbols actually present (two varints in the header), so a quantizer
that declares 256 levels but uses 20 costs as much as a 20-symbol alphabet.

Measured cost (see tests/codecs/test_entropy.py): within 1-3 % of the empirical zeroth-order
entropy n * H for n >= 10,000 whenever n * H is more than a few hundred bytes; the remaining
overhead is a few bytes to ~150 bytes per message (the price of learning the distribution, about
(A - 1)/2 * log2(n) bits for A used symbols, plus up to 4 bytes of coder termination). When the
coded form would not be smaller than plain bit-packing (tiny or uniform messages), the symbols
are bit-packed instead; a message whose symbols are all equal costs its header only.

Input: an integer array whose spec declares its symbol range (a quantizer's output, stc's signs).

side (u8 mode first):
    0: bit-packed, body = `raw`'s packing of the declared range
    2: range coded; varint (min - lo) | varint (max - min) | varint words; body = that many
       32-bit little-endian words (the count makes a truncated body detectable)
    3: constant; varint (value - lo); body empty
    1: (read only: the first format) range coded over the whole declared range, blocks of 64
       doubling, varint word count
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
MAX_BLOCK = 1 << 16
PRIOR = 0.5  # Krichevsky-Trofimov

PACKED, LEGACY, CODED, CONSTANT = 0, 1, 2, 3


def _symbol_spec(spec: Spec) -> ArraySpec:
    if not isinstance(spec, ArraySpec) or spec.symbols is None:
        raise CodecError(
            "entropy codes integer symbols: put a quantizer (quantize, qsgd, sign, stc) before it"
        )
    if spec.dtype.kind not in "iu":
        raise CodecError(f"entropy codes integer symbols, got {spec.dtype}")
    lo, hi = spec.symbols
    if hi < lo:
        raise CodecError(f"entropy: empty symbol range [{lo}, {hi}]")
    if hi - lo + 1 > MAX_ALPHABET:
        raise CodecError(f"entropy: alphabet of {hi - lo + 1} symbols exceeds {MAX_ALPHABET}")
    return spec


def _blocks(n: int, legacy: bool = False) -> Iterator[tuple[int, int]]:
    """Block boundaries: 1, 2, 3, 4, 6, 9, ... growing by half up to MAX_BLOCK (legacy: 64 doubling)."""
    start, size = 0, 64 if legacy else 1
    while start < n:
        end = min(n, start + size)
        yield start, end
        start = end
        size = min(size * 2 if legacy else max(size + 1, size * 3 // 2), MAX_BLOCK)


def _shifted(values: np.ndarray, offset: int) -> np.ndarray:
    """values + offset as int32, for results that fit in int32 (as symbols and their values do here).

    Narrow inputs take int32 arithmetic, wrapping where it must: exact modulo 2**32, so exact for
    results that fit; no int64 copy of a model-sized array."""
    if values.dtype.itemsize > 4:
        return (values.astype(np.int64) + offset).astype(np.int32)
    shifted = values.astype(np.int32)  # a copy: the caller's array is left alone
    shifted += np.int64(offset).astype(np.int32)
    return shifted


def _model(counts: np.ndarray) -> object:
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def _range_encode(symbols: np.ndarray, alphabet: int) -> bytes:
    encoder = constriction.stream.queue.RangeEncoder()
    counts = np.full(alphabet, PRIOR)
    for start, end in _blocks(symbols.size):
        block = symbols[start:end]
        encoder.encode(block, _model(counts))
        counts += np.bincount(block, minlength=alphabet)
    return bytes(encoder.get_compressed().astype("<u4").tobytes())


def _range_decode(data: bytes, count: int, alphabet: int, legacy: bool) -> np.ndarray:
    """Exactly `count` symbols in [0, alphabet); CodecError if constriction refuses the data."""
    if len(data) % 4:
        raise CodecError(
            f"entropy: {len(data)} bytes of range-coded data is not a whole number of 32-bit words"
        )
    out = np.empty(count, dtype=np.int32)
    counts = np.full(alphabet, PRIOR)
    try:
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
        for start, end in _blocks(count, legacy):
            block = np.asarray(decoder.decode(_model(counts), end - start))
            if block.shape != (end - start,) or (
                block.size and (int(block.min()) < 0 or int(block.max()) >= alphabet)
            ):
                raise CodecError("entropy: the range decoder returned out-of-range symbols")
            out[start:end] = block
            counts += np.bincount(block, minlength=alphabet)
    except CodecError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException as exc:  # constriction raises ValueError/RuntimeError, or pyo3's PanicException
        raise CodecError(f"entropy: corrupt range-coded data: {exc}") from exc
    return out


@dataclass(frozen=True)
class _Header:
    mode: int
    first: int = 0  # offset of the smallest symbol present from the declared lo
    width: int = 0  # max - min of the symbols present
    words: int = 0  # range-coded modes: body length in 32-bit words


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
        lo, _ = s.symbols
        if arr.size:
            first, last = int(arr.min()) - lo, int(arr.max()) - lo
            if first == last:
                return SideWriter().u8(CONSTANT).varint(first).getvalue(), b""
            symbols = _shifted(arr, -(lo + first))
            coded = _range_encode(symbols, last - first + 1)
            side = (
                SideWriter().u8(CODED).varint(first).varint(last - first).varint(len(coded) // 4).getvalue()
            )
            if len(side) + len(coded) < 1 + Raw.serialized_size(s):  # else bit-packing is smaller
                return side, coded
        _, packed = Raw().encode(arr, s, {})
        assert isinstance(packed, bytes)
        return SideWriter().u8(PACKED).getvalue(), packed

    @staticmethod
    def _header(spec: ArraySpec, side: bytes) -> _Header:
        assert spec.symbols is not None
        span = spec.symbols[1] - spec.symbols[0]
        r = SideReader(side, "entropy")
        mode = r.u8()
        if mode == PACKED:
            header = _Header(mode)
        elif mode == LEGACY:
            header = _Header(mode, 0, span, r.varint())
        elif mode == CODED:
            first, width, words = r.varint(), r.varint(), r.varint()
            if width < 1 or first + width > span:
                raise CodecError(
                    f"entropy: symbol range [{first}, {first + width}] outside the declared [0, {span}]"
                )
            header = _Header(mode, first, width, words)
        elif mode == CONSTANT:
            first = r.varint()
            if first > span:
                raise CodecError(f"entropy: constant symbol {first} outside the declared [0, {span}]")
            header = _Header(mode, first)
        else:
            raise CodecError(f"entropy: unknown mode {mode} in header")
        r.finish()
        if mode in (CODED, CONSTANT, LEGACY) and spec.count == 0:
            raise CodecError("entropy: coded header for an empty message")
        return header

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        s = _symbol_spec(spec)
        header = self._header(s, side)
        limit = Raw.serialized_size(s)
        if header.mode == CONSTANT:
            return BytesSpec(0)
        if header.mode in (LEGACY, CODED):
            if 4 * header.words > limit:
                raise CodecError(
                    f"entropy: {4 * header.words} coded bytes exceed the bit-packed size {limit}"
                )
            return BytesSpec(4 * header.words)
        return BytesSpec(limit)

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        s = _symbol_spec(spec)
        assert s.symbols is not None
        data = BytesSpec(Raw.serialized_size(s)).check(y, "entropy body")
        header = self._header(s, side)
        lo = s.symbols[0]
        if header.mode == PACKED:
            return Raw().decode(b"", data, s, {})
        if header.mode == CONSTANT:
            if data:
                raise CodecError("entropy: a constant message has no body")
            return np.full(s.count, lo + header.first, dtype=s.dtype)
        if len(data) != 4 * header.words:
            raise CodecError(f"entropy: {len(data)} bytes of coded data, the header says {4 * header.words}")
        symbols = _range_decode(data, s.count, header.width + 1, legacy=header.mode == LEGACY)
        return _shifted(symbols, lo + header.first).astype(s.dtype, copy=False)
