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
Two formats code this model; `encode_mask` writes format 1 for maps of up to BITWISE_MAX (2**20)
entries, so every message of the models the federation benchmarks train (under 100k parameters) keeps its
bytes, and format 2
above; `decode_mask` reads both.

Format 1: every bit goes through one range coder (constriction's Bernoulli model at the
probabilities above). The encoder computes every probability at once (cumulative sums over
blocks); the decoder makes one vectorised call per block, at most 24 per tensor. It touches
every entry of the active rows: 11M binary decisions for the 11M-parameter update, which
constriction decodes in no less than 140 ms however the calls are made.

Format 2 codes the same probabilities with O(k) symbols. Within a block the context of each
column is fixed, so the block's entries at context s are i.i.d. Bernoulli(p_s): a segment. A
segment is cut into chunks of about 1 / (2 p) entries; each chunk's count is coded by its
Binomial law (one categorical symbol), then which of the chunk's entries are kept, uniformly
among the C(size, count) subsets: a subset of up to 3 is one uniform symbol (its combinadic
rank), a larger one is halved by the hypergeometric law until it is. Binomial(count) / C(size,
count) is exactly the probability of the chunk's bits, so format 2 costs what format 1 costs, to
the coder's rounding (measured: within a few bytes, either way, plus its marker byte). Block b of
every tensor forms round b: the decoder makes a few calls per round (at most 24 rounds), the
encoder computes all rounds at once. The tables use multiplications and divisions only, so both
sides compute the same bits on any machine.

Format 1: varint T | flags (ceil(T / 8) bytes, bit t: tensor t transposed) | per tensor varint k_t,
and varint A when 0 < k_t < n_t | varint words | words (u32, the range coder's output).
Format 2: 0x00 | the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

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
    return [
        (t.shape[0], t.numel // t.shape[0]) if len(t.shape) >= 2 and t.shape[0] else (1, t.numel)
        for t in layout
    ]


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
    return np.asarray(np.minimum(np.maximum(p, _P_MIN), 1 - _P_MIN))  # np.clip's values, without its overhead


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


def encode_mask(idx: np.ndarray, spec: ArraySpec, version: int | None = None) -> bytes:
    """Sorted kept positions in [0, spec.count) -> bytes (see the module docstring): format 1 for maps of
    up to BITWISE_MAX entries, format 2 above (or the `version` given)."""
    if version is None:
        version = 1 if spec.count <= BITWISE_MAX else 2
    if version not in (1, 2):
        raise CodecError(f"position map: unknown format {version}")
    return _encode_bits(idx, spec) if version == 1 else _encode_counts(idx, spec)


def _encode_bits(idx: np.ndarray, spec: ArraySpec) -> bytes:
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
    return (
        head.raw(np.packbits(flags).tobytes())
        .raw(counts.getvalue())
        .varint(words.size)
        .array(words.astype(np.uint32))
        .getvalue()
    )


def _split(mask: np.ndarray, shapes: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    offset = 0
    for r, c in shapes:
        yield mask[offset : offset + r * c]
        offset += r * c


def decode_mask(data: bytes, spec: ArraySpec, k: int, who: str) -> np.ndarray:
    """Inverse of encode_mask (either format); CodecError unless the data decodes to exactly k positions."""
    if data[:1] == FORMAT2:
        return _decode_counts(data, spec, k, who)
    shapes = matrix_shapes(spec)
    rd = SideReader(data, who)
    if rd.varint() != len(shapes):
        raise CodecError(f"{who}: position map for a different number of tensors")
    flags = np.unpackbits(np.frombuffer(rd.raw(math.ceil(len(shapes) / 8)), dtype=np.uint8))[
        : len(shapes)
    ].astype(bool)
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


# -- format 2: the same model, coded as counts ------------------------------------------------------
# Format 1 starts with varint T >= 1 (an empty layout's map, T = 0, is never sent: Golomb-Rice's one byte is shorter).
FORMAT2 = b"\x00"
BITWISE_MAX = 1 << 20  # maps of up to this many entries keep format 1 (and their bytes)
_CHUNK_LOAD = 0.5  # expected kept entries per chunk
_COUNT_CAP = 7  # chunk counts 0..6 by their Binomial law; the symbol 7 means "7 or more"
_EXACT_SPLIT = 32  # tree nodes with up to this many entries split by the hypergeometric law
_MAX_LEAF = 1 << 23  # constriction's Uniform model takes sizes below 2**24
_LEAF_MAX = 3  # nodes of up to 3 entries: one subset rank, while C(size, count) <= _MAX_LEAF
_LEAF_SIZE = np.array([0, _MAX_LEAF, 4096, 370, 0])  # the largest size for 0, 1, 2, 3, more entries
_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
_UNIFORM = constriction.stream.model.Uniform()


class _Coder:
    """One range coder, encoding given symbols or decoding them (values None), so that the walk over
    segments, chunks and tree nodes is written once for both sides."""

    def __init__(self, words: np.ndarray | None = None, who: str = "") -> None:
        self.encoding = words is None
        self.who = who
        q = constriction.stream.queue
        self.coder = q.RangeEncoder() if words is None else q.RangeDecoder(words)

    def categorical(self, table: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        return self._code(_CATEGORICAL, values, table.shape[0], table)

    def categorical_run(self, row: np.ndarray, n: int, values: np.ndarray | None) -> np.ndarray:
        """n symbols from one distribution (faster than a table per symbol)."""
        if self.encoding:
            assert values is not None
            if n:
                self.coder.encode(
                    values.astype(np.int32), constriction.stream.model.Categorical(row, perfect=False)
                )
            return values
        return self._code(constriction.stream.model.Categorical(row, perfect=False), None, n, None)

    def uniform(self, sizes: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        return self._code(_UNIFORM, values, sizes.size, sizes.astype(np.int32))

    def _code(self, model: object, values: np.ndarray | None, n: int, param: np.ndarray | None) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if self.encoding:
            assert values is not None and param is not None
            self.coder.encode(values.astype(np.int32), model, param)
            return values.astype(np.int64)
        try:
            args = (n,) if param is None else (param,)
            return np.asarray(self.coder.decode(model, *args), dtype=np.int64)
        except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
            raise
        except BaseException as exc:  # constriction raises ValueError/RuntimeError, or pyo3's PanicException
            raise CodecError(f"{self.who}: position map does not decode: {exc}") from exc

    def check(self, ok: bool | np.bool_, what: str) -> None:
        if not ok:
            raise CodecError(f"{self.who}: position map: {what}")


def _power(base: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """base ** exponent by squaring: multiplications only, so both sides get the same bits on any machine."""
    out, b, e = np.ones_like(base), base.copy(), exponent.astype(np.int64)
    for _ in range(int(e.max(initial=0)).bit_length()):  # over the exponent's bits
        out *= np.where(e & 1, b, 1.0)
        b *= b
        e >>= 1
    return out


def _binomial_table(sizes: np.ndarray, p: np.ndarray) -> np.ndarray:
    """P(count = c) for c < _COUNT_CAP of Binomial(size, p), then P(count >= _COUNT_CAP); rows per chunk."""
    table = np.zeros((sizes.size, _COUNT_CAP + 1))
    table[:, 0] = _power(1 - p, sizes)
    odds = p / (1 - p)
    for c in range(_COUNT_CAP - 1):  # over the table's columns
        table[:, c + 1] = table[:, c] * (np.maximum(sizes - c, 0) / (c + 1)) * odds
    below = table[:, 0].copy()
    for c in range(1, _COUNT_CAP):  # summed column by column: the same bits for a row in any batch
        below += table[:, c]
    table[:, _COUNT_CAP] = np.where(sizes >= _COUNT_CAP, np.maximum(1 - below, 0), 0)
    return table


def _hypergeometric_table(left: np.ndarray, right: np.ndarray, count: np.ndarray, width: int) -> np.ndarray:
    """P(j of `count` entries in the left part) ~ C(left, j) C(right, count - j), by ratios of successive terms."""
    j = np.arange(width)[None, :]
    c, L, R = count[:, None], left[:, None], right[:, None]
    lo, hi = np.maximum(0, c - R), np.minimum(c, L)
    inside = (j >= lo) & (j < hi)  # ratio term j -> j + 1 within the support
    ratio = np.where(inside, (L - j) * (c - j), 1) / np.where(inside, (j + 1) * (R - c + j + 1), 1)
    table = np.cumprod(np.concatenate([np.ones((count.size, 1)), ratio[:, :-1]], axis=1), axis=1)
    return np.asarray(np.where((j >= lo) & (j <= hi), table, 0.0))


def _count_in(ones: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    return np.searchsorted(ones, stop) - np.searchsorted(ones, start)


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Every position in [start, start + size) for each pair, concatenated."""
    total = int(sizes.sum())
    return np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(total)


def _subsets(sizes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """C(size, count) for leaf nodes (counts 1.._LEAF_MAX, sizes up to _LEAF_SIZE[count])."""
    pairs = _choose(sizes, 2)
    return np.where(counts == 1, sizes, np.where(counts == 2, pairs, _choose(sizes, 3)))


def _is_leaf(sizes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return (counts < sizes) & (sizes <= _LEAF_SIZE[np.minimum(counts, _LEAF_MAX + 1)])


def _leaves(
    io: _Coder, starts: np.ndarray, sizes: np.ndarray, counts: np.ndarray, ones: np.ndarray | None
) -> np.ndarray:
    """Nodes of 1.._LEAF_MAX entries, each subset coded as one uniform symbol: its combinadic rank
    sum_j C(x_j, j) over its sorted offsets x_1 < ... < x_c (colex order)."""
    subsets = _subsets(sizes, counts)
    rank = io.uniform(subsets, None if ones is None else _leaf_ranks(starts, counts, ones))
    if ones is not None:
        return ones
    found = []
    for c in range(1, _LEAF_MAX + 1):
        sel = np.flatnonzero(counts == c)
        r = rank[sel]
        for j in range(c, 1, -1):  # the largest offset first: the x with C(x, j) <= r < C(x + 1, j)
            table = _choose(np.arange(int(sizes[sel].max(initial=0)) + 1), j)
            x = np.searchsorted(table, r, side="right") - 1
            r = r - table[x]
            found.append(starts[sel] + x)
        found.append(starts[sel] + r)
    return np.concatenate(found)


def _leaf_ranks(starts: np.ndarray, counts: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """The combinadic rank of each leaf's subset (encoder)."""
    first = np.searchsorted(ones, starts)
    rank = ones[first] - starts
    for j in range(2, _LEAF_MAX + 1):
        has = np.flatnonzero(counts >= j)
        rank[has] += _choose(ones[first[has] + j - 1] - starts[has], j)
    return np.asarray(rank)


def _choose(x: np.ndarray, j: int) -> np.ndarray:
    """C(x, j) for j = 2, 3, exact in int64 (x below 2**20)."""
    pairs = x * (x - 1) // 2
    return np.asarray(pairs if j == 2 else pairs * (x - 2) // 3)


def _tree(
    io: _Coder, starts: np.ndarray, sizes: np.ndarray, counts: np.ndarray, ones: np.ndarray | None
) -> np.ndarray:
    """Positions of `counts` entries in each [start, start + size): a node of a few entries is one subset
    rank (`_leaves`), a larger one is split in halves by the hypergeometric law. Together: log2 C(size,
    count) bits, what a uniformly random subset of that size costs."""
    found: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    leaf_parts = [(starts[:0], sizes[:0], counts[:0])]
    while starts.size:  # one pass per tree level, at most log2(size) + 1
        full = counts == sizes
        if ones is None:
            found.append(_ranges(starts[full], sizes[full]))
        leaf = _is_leaf(sizes, counts)
        leaf_parts.append((starts[leaf], sizes[leaf], counts[leaf]))
        split = (counts >= 1) & ~full & ~leaf
        starts, sizes, counts = starts[split], sizes[split], counts[split]
        if not starts.size:
            break
        half = sizes // 2
        truth = None if ones is None else _count_in(ones, starts, starts + half)
        left = _left_counts(io, half, sizes - half, counts, truth)
        starts, sizes = np.concatenate([starts, starts + half]), np.concatenate([half, sizes - half])
        counts = np.concatenate([left, counts - left])
    ls, sz, cn = (np.concatenate(parts) for parts in zip(*leaf_parts, strict=True))
    found.append(_leaves(io, ls, sz, cn, ones))
    return ones if ones is not None else np.sort(np.concatenate(found))


def _left_counts(
    io: _Coder, left: np.ndarray, right: np.ndarray, count: np.ndarray, truth: np.ndarray | None
) -> np.ndarray:
    """How many of each node's entries lie in its left half: exact law up to _EXACT_SPLIT entries, in groups
    of equal table width; uniform over the possible counts above (only a badly predicted dense chunk)."""
    out = np.zeros(count.size, dtype=np.int64)
    lo, hi = np.maximum(0, count - right), np.minimum(count, left)
    exact = count <= _EXACT_SPLIT
    width = np.where(exact, 2 ** np.frexp(count.astype(np.float64))[1], 0).astype(np.int64)  # > count
    for w in np.unique(width[exact]):  # a few table widths per level
        sel = np.flatnonzero(width == w)
        table = _hypergeometric_table(left[sel], right[sel], count[sel], int(w))
        out[sel] = io.categorical(table, None if truth is None else truth[sel])
    sel = np.flatnonzero(~exact)
    out[sel] = lo[sel] + io.uniform(hi[sel] - lo[sel] + 1, None if truth is None else truth[sel] - lo[sel])
    io.check(((out >= lo) & (out <= hi)).all(), "a split count outside its range")
    return out


def _segments(io: _Coder, lengths: np.ndarray, p: np.ndarray, ones: np.ndarray | None) -> np.ndarray:
    """Segments laid end to end, each i.i.d. Bernoulli(p) over its length: the kept positions within.

    Each segment is cut into chunks of about _CHUNK_LOAD / p entries; a chunk's count is coded by its
    Binomial law, then its positions by `_tree`. Binomial times 1 / C(size, count) is the probability
    of the chunk's bits, so this costs what coding every bit at p costs, in O(count) symbols."""
    if not lengths.size:
        return np.zeros(0, dtype=np.int64)
    per = np.minimum(np.maximum(1, np.floor(_CHUNK_LOAD / p)).astype(np.int64), lengths)
    chunks = -(-lengths // per)
    seg = np.repeat(np.arange(lengths.size), chunks)
    i = np.arange(seg.size) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    starts = (np.cumsum(lengths) - lengths)[seg] + i * per[seg]
    sizes = np.minimum(per[seg], lengths[seg] - i * per[seg])
    truth = None if ones is None else _count_in(ones, starts, starts + sizes)  # encoder
    capped = None if truth is None else np.minimum(truth, _COUNT_CAP)
    # A segment's chunks share one distribution, but for its last (shorter) chunk: those go together last.
    counts = np.zeros(seg.size, dtype=np.int64)
    first = np.cumsum(chunks) - chunks
    last = first + chunks - 1
    rows = _binomial_table(np.concatenate([per, sizes[last]]), np.concatenate([p, p]))
    for j in np.flatnonzero(chunks > 1):  # over segments
        run = slice(first[j], first[j] + chunks[j] - 1)
        counts[run] = io.categorical_run(rows[j], int(chunks[j] - 1), None if capped is None else capped[run])
    counts[last] = io.categorical(rows[lengths.size :], None if capped is None else capped[last])
    io.check((counts <= sizes).all(), "a chunk count above the chunk's size")
    more = np.flatnonzero((counts == _COUNT_CAP) & (sizes > _COUNT_CAP))
    counts[more] += io.uniform(
        sizes[more] - _COUNT_CAP + 1, None if truth is None else truth[more] - _COUNT_CAP
    )
    some = np.flatnonzero(counts)
    return _tree(io, starts[some], sizes[some], counts[some], ones)


@dataclass
class _Maps:
    """The coded tensors (0 < k_t < n_t) of one map, each as its (rows, cols) matrix in coded orientation."""

    rows: np.ndarray
    cols: np.ndarray
    active: np.ndarray  # A: rows with any entry
    kept: np.ndarray  # k_t

    def __post_init__(self) -> None:
        self.size = np.maximum(1, -(-self.active // _MAX_BLOCKS))  # block_rows, per matrix
        self.blocks = -(-self.active // self.size)
        self.density = self.kept / (self.active * self.cols)


def _active_rows(io: _Coder, maps: _Maps, rows: np.ndarray | None) -> np.ndarray:
    """Which rows hold entries: per matrix with A < R, R bits at probability A / R (as in format 1);
    the global row numbers (row + offset of the matrix in sum(R)), sorted."""
    partial = np.flatnonzero(maps.active < maps.rows)
    offsets = np.cumsum(maps.rows) - maps.rows
    lengths = maps.rows[partial]
    seg_off = np.cumsum(lengths) - lengths
    virtual = None
    if rows is not None and partial.size:  # encoder: rows are global row numbers
        m = np.searchsorted(offsets, rows, side="right") - 1
        pos = np.searchsorted(partial, m)
        hit = (pos < partial.size) & (partial[np.minimum(pos, partial.size - 1)] == m)
        virtual = seg_off[pos[hit]] + rows[hit] - offsets[m[hit]]
    elif rows is not None:
        virtual = np.zeros(0, dtype=np.int64)
    got = _segments(io, lengths, _clip(maps.active[partial] / lengths), virtual)
    seg = np.searchsorted(seg_off, got, side="right") - 1
    decoded = offsets[partial[seg]] + got - seg_off[seg]
    io.check(
        (np.bincount(partial[seg], minlength=maps.rows.size)[partial] == maps.active[partial]).all(),
        "active rows do not match the header",
    )
    full = np.flatnonzero(maps.active == maps.rows)
    return np.sort(np.concatenate([decoded, _ranges(offsets[full], maps.rows[full])]))


def _rounds(
    io: _Coder, maps: _Maps, entries: tuple[np.ndarray, np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, ...]:
    """Every block of every matrix, block b of all matrices in round b (at most _MAX_BLOCKS rounds):
    within a block the context of each column is fixed, so its entries form three i.i.d. segments
    (per matrix and context: the block's rows times the columns at that context, in order).

    entries (encoder): (matrix, active row rank, column) of every kept entry. Returns the same, decoded."""
    n_mat = maps.rows.size
    # Contexts exist from the second block on: only matrices of several blocks keep them.
    multi_cols = np.where(maps.blocks > 1, maps.cols, 0)
    multi_off = np.cumsum(multi_cols) - multi_cols
    col_matrix = np.repeat(np.arange(n_mat), multi_cols)
    col_blocks = maps.blocks[col_matrix]
    ctx = np.zeros(int(multi_cols.sum()), dtype=np.int64)  # min(2, entries kept above), per column
    kept = np.zeros((n_mat, _CONTEXTS))
    total = np.zeros((n_mat, _CONTEXTS))
    rounds = int(maps.blocks.max(initial=0))
    if entries is not None:
        e_mat, e_row, e_col = entries
        by_block = np.argsort(e_row // maps.size[e_mat], kind="stable")
        bounds = np.searchsorted((e_row // maps.size[e_mat])[by_block], np.arange(rounds + 1))
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for b in range(rounds):  # one round per block index, not per element
        ncols = np.zeros((n_mat, _CONTEXTS), dtype=np.int64)
        if b == 0:  # every column at context 0, in order
            ncols[:, 0] = maps.cols
        else:
            cols_b = np.flatnonzero(col_blocks > b)
            ctx_b = ctx[cols_b]
            by_ctx = [cols_b[ctx_b == t] for t in range(_CONTEXTS)]  # per context: (matrix, column) order
            for t in range(_CONTEXTS):
                ncols[:, t] = np.bincount(col_matrix[by_ctx[t]], minlength=n_mat)
            in_ctx = np.cumsum(ncols, axis=0) - ncols  # where matrix m starts in by_ctx[s]
        flat_ncols = ncols.ravel()
        n_rows = np.where(maps.blocks > b, np.minimum(maps.size, maps.active - b * maps.size), 0)
        lengths = (n_rows[:, None] * ncols).ravel()
        pairs = np.flatnonzero(lengths)
        seg_len = lengths[pairs]
        seg_off = np.cumsum(seg_len) - seg_len
        p = _context_probability(kept, total, maps.density[:, None]).ravel()[pairs]
        virtual = None
        if entries is not None:
            sel = by_block[bounds[b] : bounds[b + 1]]
            m, r, c = e_mat[sel], e_row[sel] - b * maps.size[e_mat[sel]], e_col[sel]
            if b == 0:
                pair, rank = m * _CONTEXTS, c
            else:
                g = multi_off[m] + c
                s = ctx[g]
                pair = m * _CONTEXTS + s
                rank = np.zeros(sel.size, dtype=np.int64)
                for t in range(_CONTEXTS):
                    here = s == t
                    rank[here] = np.searchsorted(by_ctx[t], g[here]) - in_ctx[m[here], t]
            seg_of_pair = np.full(n_mat * _CONTEXTS, -1)
            seg_of_pair[pairs] = np.arange(pairs.size)
            virtual = np.sort(seg_off[seg_of_pair[pair]] + r * flat_ncols[pair] + rank)
        got = _segments(io, seg_len, p, virtual)
        if entries is None:
            seg = np.searchsorted(seg_off, got, side="right") - 1
            pair = pairs[seg]
            m = pair // _CONTEXTS
            local = got - seg_off[seg]
            width = flat_ncols[pair]
            rank = local % width
            r = local // width
            if b == 0:
                c = rank
            else:
                s = pair % _CONTEXTS
                c = np.zeros(got.size, dtype=np.int64)
                for t in range(_CONTEXTS):
                    here = s == t
                    c[here] = by_ctx[t][in_ctx[m[here], t] + rank[here]] - multi_off[m[here]]
        out.append((m, b * maps.size[m] + r, c))
        kept += np.bincount(pair, minlength=n_mat * _CONTEXTS).reshape(n_mat, _CONTEXTS)
        total += n_rows[:, None] * ncols
        io.check((kept.sum(axis=1) <= maps.kept).all(), "more entries than the header declares")
        later = maps.blocks[m] > b + 1
        hit = multi_off[m[later]] + c[later]
        ctx = np.minimum(ctx + np.bincount(hit, minlength=ctx.size), _CONTEXTS - 1)
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


def _distinct(sorted_values: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts, in a sorted array (np.unique without its hashing)."""
    return (
        np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
        if sorted_values.size
        else np.zeros(0, np.int64)
    )


def _encode_rounds(io: _Coder, maps: _Maps, e_mat: np.ndarray, e_row: np.ndarray, e_col: np.ndarray) -> None:
    """What `_rounds` codes for these entries, with every round's contexts, segments, chunks and tree
    nodes computed at once; only the coder calls go round by round, in the order the decoder makes them.
    (`_rounds` with the entries is the reference: tests check both give the same bytes.)"""
    n_mat, rounds = maps.rows.size, int(maps.blocks.max(initial=0))
    width = rounds + 1
    block = e_row // maps.size[e_mat]
    # Contexts: per entry, min(2, entries in its column in earlier blocks), from a (column, block) sort.
    col_off = np.cumsum(maps.cols) - maps.cols
    order = np.argsort((col_off[e_mat] + e_col) * width + block, kind="stable")
    g, b_sorted = (col_off[e_mat] + e_col)[order], block[order]
    new_group = np.concatenate(([True], (g[1:] != g[:-1]) | (b_sorted[1:] != b_sorted[:-1])))
    new_col = np.concatenate(([True], g[1:] != g[:-1]))
    at = np.arange(g.size)
    ctx = np.empty(g.size, dtype=np.int64)
    ctx[order] = np.minimum(
        np.maximum.accumulate(np.where(new_group, at, 0)) - np.maximum.accumulate(np.where(new_col, at, 0)), 2
    )
    # Per distinct column: the blocks of its first and second entries, after which its context is 1 and 2.
    first = np.flatnonzero(new_col)
    column = np.cumsum(new_col) - 1  # distinct-column index, in sorted order
    d_mat = e_mat[order][first]
    f1 = b_sorted[first]
    nxt = np.minimum(first + 1, g.size - 1)
    f2 = np.where((first + 1 < g.size) & ~new_col[nxt], b_sorted[nxt], rounds)  # `rounds`: never
    per_block = [
        np.bincount(d_mat * width + f, minlength=n_mat * width).reshape(n_mat, width) for f in (f1, f2)
    ]
    above = [np.cumsum(h, axis=1) - h for h in per_block]  # columns with f < b, per (matrix, block)
    # (M, B, 3)
    ncols = np.stack([maps.cols[:, None] - above[0], above[0] - above[1], above[1]], axis=2)[:, :rounds]
    n_rows = np.clip(
        maps.active[:, None] - np.arange(rounds)[None, :] * maps.size[:, None], 0, maps.size[:, None]
    )
    total = n_rows[:, :, None] * ncols
    kept = np.bincount(
        (e_mat * rounds + block) * _CONTEXTS + ctx, minlength=n_mat * rounds * _CONTEXTS
    ).reshape(n_mat, rounds, _CONTEXTS)
    p_all = _context_probability(
        (np.cumsum(kept, axis=1) - kept).astype(np.float64),
        (np.cumsum(total, axis=1) - total).astype(np.float64),
        maps.density[:, None, None],
    )
    # Segments in stream order: round, matrix, context.
    lengths = total.transpose(1, 0, 2).ravel()
    pairs = np.flatnonzero(lengths)
    seg_len, seg_p = lengths[pairs], p_all.transpose(1, 0, 2).ravel()[pairs]
    seg_round = pairs // (n_mat * _CONTEXTS)
    seg_off = np.cumsum(seg_len) - seg_len
    seg_of = np.full(lengths.size, -1)
    seg_of[pairs] = np.arange(pairs.size)
    # Each entry's place in its segment: its row in the block times the segment's columns, plus the rank of
    # its column among the matrix's columns at that context (counts of earlier columns with f1, f2 < b).
    below = np.zeros((2, width, first.size), dtype=np.int32)
    start_of = np.searchsorted(d_mat, d_mat)  # a matrix's first distinct column
    for i, f in enumerate((f1, f2)):
        hit = f[None, :] < np.arange(width)[:, None]
        excl = np.cumsum(hit, axis=1, dtype=np.int32) - hit
        below[i] = excl - excl[:, start_of]
    e_col_index = np.empty(g.size, dtype=np.int64)
    e_col_index[order] = column
    t1, t2 = below[0][block, e_col_index], below[1][block, e_col_index]
    rank = np.select([ctx == 0, ctx == 1], [e_col - t1, t1 - t2], t2)
    flat = (block * n_mat + e_mat) * _CONTEXTS + ctx
    ones = np.sort(
        seg_off[seg_of[flat]] + (e_row - block * maps.size[e_mat]) * ncols[e_mat, block, ctx] + rank
    )
    _emit_segments(io, seg_len, seg_p, seg_round, rounds, ones)


def _emit_segments(
    io: _Coder, lengths: np.ndarray, p: np.ndarray, seg_round: np.ndarray, rounds: int, ones: np.ndarray
) -> None:
    """`_segments` for every round's segments at once, the symbols coded round by round in its order."""
    per = np.minimum(np.maximum(1, np.floor(_CHUNK_LOAD / p)).astype(np.int64), lengths)
    chunks = -(-lengths // per)
    seg = np.repeat(np.arange(lengths.size), chunks)
    i = np.arange(seg.size) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    starts = (np.cumsum(lengths) - lengths)[seg] + i * per[seg]
    sizes = np.minimum(per[seg], lengths[seg] - i * per[seg])
    first = np.cumsum(chunks) - chunks
    ones_seg = np.searchsorted(np.cumsum(lengths), ones, side="right")
    chunk_of = first[ones_seg] + (ones - (np.cumsum(lengths) - lengths)[ones_seg]) // per[ones_seg]
    truth = np.bincount(chunk_of, minlength=seg.size)
    capped = np.minimum(truth, _COUNT_CAP)
    last = first + chunks - 1
    rows = _binomial_table(np.concatenate([per, sizes[last]]), np.concatenate([p, p]))
    last_table = rows[lengths.size :]
    more = np.flatnonzero((capped == _COUNT_CAP) & (sizes > _COUNT_CAP))
    chunk_round = seg_round[seg]
    # The tree, level by level over all rounds: (round, level, kind, node order) of every symbol.
    splits: list[
        tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    ] = []  # level, round, left, right, count, truth
    leaf_parts = [(chunk_round[:0], starts[:0], sizes[:0], truth[:0])]  # round, start, size, count
    some = np.flatnonzero(truth)
    n_starts, n_sizes, n_counts, n_round = starts[some], sizes[some], truth[some], chunk_round[some]
    level = 0
    while n_starts.size:
        full = n_counts == n_sizes
        leaf = _is_leaf(n_sizes, n_counts)
        leaf_parts.append((n_round[leaf], n_starts[leaf], n_sizes[leaf], n_counts[leaf]))
        split = (n_counts >= 1) & ~full & ~leaf
        n_starts, n_sizes, n_counts, n_round = (
            n_starts[split],
            n_sizes[split],
            n_counts[split],
            n_round[split],
        )
        if not n_starts.size:
            break
        half = n_sizes // 2
        left = _count_in(ones, n_starts, n_starts + half)
        splits.append((level, n_round, half, n_sizes - half, n_counts, left))
        n_starts, n_sizes = (
            np.concatenate([n_starts, n_starts + half]),
            np.concatenate([half, n_sizes - half]),
        )
        n_counts, n_round = np.concatenate([left, n_counts - left]), np.concatenate([n_round, n_round])
        level += 1
    leaf_round, leaf_start, leaf_size, leaf_count = (
        np.concatenate(parts) for parts in zip(*leaf_parts, strict=True)
    )
    leaf_order = np.argsort(leaf_round, kind="stable")  # per round: level by level, as `_tree` collects them
    leaf_bounds = np.searchsorted(leaf_round[leaf_order], np.arange(rounds + 1))
    leaf_subsets = _subsets(leaf_size, leaf_count)[leaf_order]
    leaf_rank = _leaf_ranks(leaf_start, leaf_count, ones)[leaf_order]
    levels = [_split_groups(rounds, *level[1:]) for level in splits]
    seg_bounds = np.searchsorted(seg_round, np.arange(rounds + 1))
    more_round = chunk_round[more]
    for b in range(rounds):  # the coder's calls, in the decoder's order
        for j in range(seg_bounds[b], seg_bounds[b + 1]):
            if chunks[j] > 1:
                io.categorical_run(rows[j], int(chunks[j] - 1), capped[first[j] : last[j]])
        js = slice(seg_bounds[b], seg_bounds[b + 1])
        io.categorical(last_table[js], capped[last[js]])
        esc = more[more_round == b]
        io.uniform(sizes[esc] - _COUNT_CAP + 1, truth[esc] - _COUNT_CAP)
        for groups in levels:
            for table, values, uniform in groups[b]:
                if uniform is None:
                    io.categorical(table, values)
                else:
                    io.uniform(uniform, values)
        sel = slice(leaf_bounds[b], leaf_bounds[b + 1])
        io.uniform(leaf_subsets[sel], leaf_rank[sel])


def _split_groups(
    rounds: int,
    node_round: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    count: np.ndarray,
    truth: np.ndarray,
) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]]:
    """One tree level's split symbols for every round, grouped as `_left_counts` codes them in each:
    (table, values, None) per table width, ascending, then (None, offsets, sizes) for the uniform ones."""
    exact = count <= _EXACT_SPLIT
    width = np.where(exact, 2 ** np.frexp(count.astype(np.float64))[1], 1 << 30).astype(np.int64)
    order = np.lexsort((width, node_round))  # by round, then width; node order kept within
    per_round: list[list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = [[] for _ in range(rounds)]
    r_s, w_s = node_round[order], width[order]
    cuts = np.flatnonzero(np.concatenate(([True], (r_s[1:] != r_s[:-1]) | (w_s[1:] != w_s[:-1]), [True])))
    tables = {}
    for w in np.unique(width[exact]):  # one table per width for every round's nodes
        sel = order[w_s == w]
        tables[int(w)] = (sel, _hypergeometric_table(left[sel], right[sel], count[sel], int(w)))
    seen = dict.fromkeys(tables, 0)
    for a, z in zip(cuts[:-1], cuts[1:], strict=True):  # over (round, width) groups
        sel = order[a:z]
        w = int(w_s[a])
        if w in tables:
            table = tables[w][1][seen[w] : seen[w] + sel.size]
            seen[w] += sel.size
            per_round[int(r_s[a])].append((table, truth[sel], None))
        else:
            lo, hi = np.maximum(0, count[sel] - right[sel]), np.minimum(count[sel], left[sel])
            per_round[int(r_s[a])].append((np.zeros(0), truth[sel] - lo, hi - lo + 1))
    return per_round


def _map_cost(row: np.ndarray, col: np.ndarray, r: int, c: int, row_major: bool) -> float:
    """Bits format 1 spends on this matrix (what format 2 spends too): the model's log-loss, from counts.

    row_major: the entries come sorted by (row, column); else sorted by (column, row)."""
    present = np.zeros(r, dtype=bool)
    present[row] = True
    rank_of = np.cumsum(present) - 1
    a = int(rank_of[-1]) + 1
    size = block_rows(a)
    blocks = -(-a // size)
    key = col * blocks + rank_of[row] // size  # entries in (column, block) order
    if row_major:
        key = np.sort(key)
    starts = _distinct(key)  # one group per (column, block)
    group_col, group_block = key[starts] // blocks, key[starts] % blocks
    new_col = np.concatenate(([True], group_col[1:] != group_col[:-1]))
    col_start = starts[new_col][np.cumsum(new_col) - 1]  # first entry of the group's column
    context = np.minimum(starts - col_start, 2)  # kept entries in the column's earlier blocks
    sizes = np.diff(np.append(starts, key.size))
    kept = np.bincount(
        group_block * _CONTEXTS + context, weights=sizes, minlength=blocks * _CONTEXTS
    ).reshape(blocks, _CONTEXTS)
    # A column's context reaches 1 after the block of its first entry, 2 after that of its second.
    first = np.flatnonzero(new_col)
    following = np.minimum(first + 1, starts.size - 1)
    same_block = sizes[first] > 1
    has_second = same_block | ((first + 1 < starts.size) & ~new_col[following])
    first_block = group_block[first]
    second_block = np.where(same_block, first_block, group_block[following])[has_second]
    ncols = np.zeros((blocks, _CONTEXTS))
    for s, blocks_in in ((1, first_block), (2, second_block)):
        h = np.bincount(blocks_in, minlength=blocks)
        ncols[:, s] = np.cumsum(h) - h
    ncols[:, 0] = c - ncols[:, 1]
    ncols[:, 1] -= ncols[:, 2]
    n_rows = np.minimum(size, a - np.arange(blocks) * size)
    total = n_rows[:, None] * ncols
    p = _context_probability(
        np.cumsum(kept, axis=0) - kept, np.cumsum(total, axis=0) - total, row.size / (a * c)
    )
    bits = -(kept * np.log2(p) + (total - kept) * np.log2(1 - p)).sum()
    if a < r:
        q = float(_clip(np.array(a / r)))
        bits += -(a * math.log2(q) + (r - a) * math.log2(1 - q))
    return float(bits)


def _encode_counts(idx: np.ndarray, spec: ArraySpec, reference: bool = False) -> bytes:
    shapes = matrix_shapes(spec)
    numel = np.array([r * c for r, c in shapes], dtype=np.int64)
    offsets = np.cumsum(numel) - numel
    idx = np.asarray(idx, dtype=np.int64)
    tensor = np.searchsorted(offsets, idx, side="right") - 1
    k_t = np.bincount(tensor, minlength=len(shapes))
    flags = np.zeros(len(shapes), dtype=bool)
    counts = SideWriter()
    rows: list[int] = []
    cols: list[int] = []
    active: list[int] = []
    coded: list[int] = []
    entries: list[tuple[np.ndarray, np.ndarray]] = []
    start = 0
    for t, (r, c) in enumerate(shapes):  # per tensor: its count and orientation
        k = int(k_t[t])
        local = idx[start : start + k] - offsets[t]
        start += k
        counts.varint(k)
        if k in (0, r * c):
            continue
        row, col = local // c, local % c
        if r > 1 and c > 1 and _map_cost(col, row, c, r, False) < _map_cost(row, col, r, c, True):
            flags[t], row, col, r, c = True, col, row, c, r
        a = _distinct(np.sort(row)).size
        counts.varint(a)
        rows.append(r)
        cols.append(c)
        active.append(a)
        coded.append(k)
        entries.append((row, col))
    io = _Coder()
    if coded:
        maps = _Maps(np.array(rows), np.array(cols), np.array(active), np.array(coded))
        row_off = np.cumsum(maps.rows) - maps.rows
        e_mat = np.repeat(np.arange(len(coded)), maps.kept)
        e_row = np.concatenate([row for row, _ in entries]) + row_off[e_mat]
        e_col = np.concatenate([col for _, col in entries])
        sorted_rows = np.sort(e_row)
        act = _active_rows(io, maps, sorted_rows[_distinct(sorted_rows)])
        rank = np.searchsorted(act, e_row) - (np.cumsum(maps.active) - maps.active)[e_mat]
        if reference:
            _rounds(io, maps, (e_mat, rank, e_col))
        else:
            _encode_rounds(io, maps, e_mat, rank, e_col)
    words = io.coder.get_compressed()
    head = (
        SideWriter().raw(FORMAT2).varint(len(shapes)).raw(np.packbits(flags).tobytes()).raw(counts.getvalue())
    )
    return head.varint(words.size).array(words.astype(np.uint32)).getvalue()


def _decode_counts(data: bytes, spec: ArraySpec, k: int, who: str) -> np.ndarray:
    shapes = matrix_shapes(spec)
    rd = SideReader(data, who)
    rd.raw(len(FORMAT2))
    if rd.varint() != len(shapes):
        raise CodecError(f"{who}: position map for a different number of tensors")
    flags = np.unpackbits(np.frombuffer(rd.raw(math.ceil(len(shapes) / 8)), dtype=np.uint8))[
        : len(shapes)
    ].astype(bool)
    numel = np.array([r * c for r, c in shapes], dtype=np.int64)
    offsets = np.cumsum(numel) - numel
    rows: list[int] = []
    cols: list[int] = []
    active: list[int] = []
    coded: list[int] = []
    where: list[int] = []
    full: list[int] = []
    total = 0
    for t, (r, c) in enumerate(shapes):
        k_t = rd.varint()
        total += k_t
        if k_t > r * c:
            raise CodecError(f"{who}: {k_t} kept entries in a tensor of {r * c}")
        if k_t == r * c and k_t:
            full.append(t)
        if not 0 < k_t < r * c:
            continue
        if flags[t]:
            r, c = c, r
        a = rd.varint()
        if not 1 <= a <= r or not a <= k_t <= a * c:
            raise CodecError(f"{who}: {k_t} kept entries cannot fill {a} of {r} rows of {c}")
        rows.append(r)
        cols.append(c)
        active.append(a)
        coded.append(k_t)
        where.append(t)
    if total != k:
        raise CodecError(f"{who}: position map holds a different number of entries than the header's {k}")
    words = rd.array(np.uint32, rd.varint())
    rd.finish()
    parts = [_ranges(offsets[full], numel[full])]
    if coded:
        io = _Coder(words, who)
        maps = _Maps(np.array(rows), np.array(cols), np.array(active), np.array(coded))
        act = _active_rows(io, maps, None)
        m, rank, col = _rounds(io, maps, None)
        io.check(
            (np.bincount(m, minlength=maps.rows.size) == maps.kept).all(),
            f"fewer entries than the header's {k}",
        )
        row = act[(np.cumsum(maps.active) - maps.active)[m] + rank] - (np.cumsum(maps.rows) - maps.rows)[m]
        io.check(
            _distinct(np.sort(m * maps.rows.max() + row)).size == int(maps.active.sum()),
            "an active row without entries",
        )
        t = np.array(where)[m]
        flip = flags[t]
        parts.append(offsets[t] + np.where(flip, col * maps.rows[m] + row, row * maps.cols[m] + col))
    return np.sort(np.concatenate(parts)).astype(np.int64)
