"""Context-coded significance maps: which k of n entries a message keeps, coded below log2 C(n, k)
when the kept entries line up in rows and columns (DeepCABAC's context modelling, seed 002).

Why: the update of a layer is a sum of outer products delta x^T, so its large entries gather in
the rows of units with a large error signal and in the columns of inputs that fire; a catch-up of
the global model inherits that structure. `positions.py` codes gaps as if positions were
uniform, which they are not. Measured in `bench.fl_bench` (rows H3/H4 against H1/H2, the same
messages): 23 % fewer uplink bytes (STC 0.5 %) and 18 % fewer catch-up downlink bytes on MNIST-1D,
39 % and 32 % on digits.

Each tensor of the layout is a matrix: rows = its first dimension, columns = the rest, or the
transpose when that codes shorter (one flag bit per tensor); a vector, or an input without a
layout, is one row. Per matrix, with k_t kept entries in A active rows (rows with any):
1. which rows are active: one bit per row at probability A / R (skipped when A = R);
2. the active rows in order, in blocks of ceil(A / 24) rows (one row per block up to 24), each
   entry at probability p_s for its context s = min(2, entries kept in its column in earlier
   blocks), with p_s = (kept_s + 2 d) / (seen_s + 2) counted over earlier blocks and
   d = k_t / (A C) the density in active rows: the first block is coded at the right rate, later
   ones at the rate their column's history predicts.
All bits go through one range coder (constriction's Bernoulli model at the probabilities
above). The encoder computes every probability at once (cumulative sums over blocks); the
decoder makes one vectorised call per block, at most 24 per tensor.

Format: varint T | flags (ceil(T / 8) bytes, bit t: tensor t transposed) | per tensor varint k_t,
and varint A when 0 < k_t < n_t | varint words | words (u32, the range coder's output).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import constriction
import numpy as np

from .base import ArraySpec, SideReader, SideWriter
from .errors import CodecError

POSITION_CODINGS = ("rice", "context")
_P_MIN = 2.0**-20
_CONTEXTS = 3  # min(2, kept entries above in the column)
_MAX_BLOCKS = 24
_MODEL = constriction.stream.model.Bernoulli(perfect=False)


def check_positions_mode(who: str, mode: object) -> None:
    if mode not in POSITION_CODINGS:
        raise CodecError(f"{who}: positions must be one of {list(POSITION_CODINGS)}, got {mode!r}")


def matrix_shapes(spec: ArraySpec) -> list[tuple[int, int]]:
    """(rows, columns) per tensor of the spec's layout; one row of n without a layout."""
    layout = spec.layout
    if layout is None or layout.numel != spec.count:
        return [(1, spec.count)]
    return [(t.shape[0], t.numel // t.shape[0]) if len(t.shape) >= 2 and t.shape[0] else (1, t.numel) for t in layout]


def block_rows(a: int) -> int:
    """Rows per block: contexts and probabilities advance once per block, so decoding makes at most
    _MAX_BLOCKS calls per tensor (each row its own block for up to _MAX_BLOCKS active rows)."""
    return max(1, math.ceil(a / _MAX_BLOCKS))


def _row_probabilities(rows: np.ndarray, density: float) -> np.ndarray:
    """The probability of every entry of the active rows (A, C), as the decoder sees it."""
    a, c = rows.shape
    size = block_rows(a)
    blocks = math.ceil(a / size)
    block_of = np.arange(a) // size
    per_block = np.add.reduceat(rows, np.arange(0, a, size), axis=0)  # (blocks, C) kept per column
    ctx = np.minimum(np.cumsum(per_block, axis=0) - per_block, _CONTEXTS - 1)[block_of]  # (A, C)
    flat = (block_of[:, None] * _CONTEXTS + ctx).ravel()
    total = np.bincount(flat, minlength=blocks * _CONTEXTS).reshape(blocks, _CONTEXTS)
    kept = np.bincount(flat, weights=rows.ravel(), minlength=blocks * _CONTEXTS).reshape(blocks, _CONTEXTS)
    p_ctx = _context_probability(np.cumsum(kept, axis=0) - kept, np.cumsum(total, axis=0) - total, density)
    return np.take_along_axis(p_ctx[block_of], ctx, axis=1)


def _context_probability(kept: np.ndarray, total: np.ndarray, density: float) -> np.ndarray:
    """p_s from the counts of earlier blocks; encoder and decoder both call this (the arithmetic must match)."""
    return _clip((kept + 2 * density) / (total + 2))


def _clip(p: np.ndarray) -> np.ndarray:
    return np.clip(p, _P_MIN, 1 - _P_MIN)


def _matrix_bits(m: np.ndarray) -> tuple[int, list[np.ndarray], list[np.ndarray]]:
    """(A, bits, probabilities) that code the boolean matrix m."""
    r, _ = m.shape
    active = np.asarray(m.any(axis=1), dtype=bool)
    a = int(active.sum())
    bits: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    if a < r:
        bits.append(active.astype(np.int32))
        probs.append(np.full(r, a / r))
    rows: np.ndarray = m[active].astype(np.int64)
    p = _row_probabilities(rows, int(rows.sum()) / rows.size)
    bits.append(np.asarray(rows.ravel(), dtype=np.int32))
    probs.append(p.ravel())
    return a, bits, probs


def _cost(bits: list[np.ndarray], probs: list[np.ndarray]) -> float:
    b, p = np.concatenate(bits), _clip(np.concatenate(probs))
    return float(-np.log2(np.where(b == 1, p, 1 - p)).sum())


def encode_mask(idx: np.ndarray, spec: ArraySpec) -> bytes:
    """Sorted kept positions in [0, spec.count) -> bytes (see the module docstring)."""
    mask = np.zeros(spec.count, dtype=bool)
    mask[idx] = True
    shapes = matrix_shapes(spec)
    flags = np.zeros(len(shapes), dtype=bool)
    head = SideWriter().varint(len(shapes))
    counts = SideWriter()
    all_bits: list[np.ndarray] = []
    all_probs: list[np.ndarray] = []
    for t, (part, (r, c)) in enumerate(zip(_split(mask, shapes), shapes, strict=True)):
        k = int(part.sum())
        counts.varint(k)
        if k in (0, r * c):
            continue
        m = part.reshape(r, c)
        a, bits, probs = _matrix_bits(m)
        if r > 1 and c > 1:
            at, bits_t, probs_t = _matrix_bits(m.T)
            if _cost(bits_t, probs_t) < _cost(bits, probs):
                flags[t], a, bits, probs = True, at, bits_t, probs_t
        counts.varint(a)
        all_bits += bits
        all_probs += probs
    encoder = constriction.stream.queue.RangeEncoder()
    if all_bits:
        encoder.encode(np.concatenate(all_bits), _MODEL, _clip(np.concatenate(all_probs)))
    words = encoder.get_compressed()
    return head.raw(np.packbits(flags).tobytes()).raw(counts.getvalue()).varint(words.size).array(words.astype(np.uint32)).getvalue()


def _split(mask: np.ndarray, shapes: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    offset = 0
    for r, c in shapes:
        yield mask[offset : offset + r * c]
        offset += r * c


def decode_mask(data: bytes, spec: ArraySpec, k: int, who: str) -> np.ndarray:
    """Inverse of encode_mask; CodecError unless the data decodes to exactly k positions."""
    shapes = matrix_shapes(spec)
    rd = SideReader(data, who)
    if rd.varint() != len(shapes):
        raise CodecError(f"{who}: position map for a different number of tensors")
    flags = np.unpackbits(np.frombuffer(rd.raw(math.ceil(len(shapes) / 8)), dtype=np.uint8))[: len(shapes)].astype(bool)
    plan: list[tuple[int, int]] = []
    for r, c in shapes:
        k_t = rd.varint()
        if k_t > r * c:
            raise CodecError(f"{who}: {k_t} kept entries in a tensor of {r * c}")
        a = rd.varint() if 0 < k_t < r * c else 0
        plan.append((k_t, a))
    if sum(k_t for k_t, _ in plan) != k:
        raise CodecError(f"{who}: position map holds a different number of entries than the header's {k}")
    words = rd.array(np.uint32, rd.varint())
    rd.finish()
    decoder = constriction.stream.queue.RangeDecoder(words)
    mask = np.zeros(spec.count, dtype=bool)
    offset = 0
    try:
        for (r, c), flip, (k_t, a) in zip(shapes, flags, plan, strict=True):
            n_t = r * c
            if k_t == n_t:
                mask[offset : offset + n_t] = True
            elif k_t:
                m = _decode_matrix(decoder, (c, r) if flip else (r, c), k_t, a, who)
                mask[offset : offset + n_t] = (m.T if flip else m).ravel()
            offset += n_t
    except (ValueError, RuntimeError) as exc:  # constriction on corrupt words
        raise CodecError(f"{who}: position map does not decode: {exc}") from exc
    return np.flatnonzero(mask).astype(np.int64)


def _decode_matrix(decoder: object, shape: tuple[int, int], k_t: int, a: int, who: str) -> np.ndarray:
    r, c = shape
    if not 1 <= a <= r or not a <= k_t <= a * c:
        raise CodecError(f"{who}: {k_t} kept entries cannot fill {a} of {r} rows of {c}")
    dec = decoder.decode  # type: ignore[attr-defined]
    active = np.ones(r, dtype=bool) if a == r else dec(_MODEL, _clip(np.full(r, a / r))).astype(bool)
    if int(active.sum()) != a:
        raise CodecError(f"{who}: position map: {int(active.sum())} active rows, the header says {a}")
    density = k_t / (a * c)
    size = block_rows(a)
    rows = np.zeros((a, c), dtype=np.int64)
    ctx = np.zeros(c, dtype=np.int64)  # min(2, kept entries in the blocks above), per column
    kept = np.zeros(_CONTEXTS)
    total = np.zeros(_CONTEXTS)
    for start in range(0, a, size):  # a block depends on the blocks before it; one decoder call each
        n_rows = min(size, a - start)
        p_ctx = _context_probability(kept, total, density)
        block = dec(_MODEL, np.tile(p_ctx[ctx], n_rows)).reshape(n_rows, c).astype(np.int64)
        rows[start : start + n_rows] = block
        hits = block.sum(axis=0)
        total += n_rows * np.bincount(ctx, minlength=_CONTEXTS)
        kept += np.bincount(ctx, weights=hits, minlength=_CONTEXTS)
        ctx = np.minimum(ctx + hits, _CONTEXTS - 1)
    if int(rows.sum()) != k_t or not rows.any(axis=1).all():
        raise CodecError(f"{who}: position map does not decode to the {k_t} entries its header declares")
    m = np.zeros((r, c), dtype=bool)
    m[active] = rows.astype(bool)
    return m
