"""Sorted positions coded close to the information bound log2 C(n, k): Golomb-Rice coding of gaps.

Gaps between k positions spread over n are near-geometric, and a Rice code with parameter
b ~ log2(ln 2 * mean gap) is within a few percent of their entropy. The encoder tries that b and
its neighbours and keeps the shortest (the decoder reads b from the first byte). When more than
half of the positions are kept, the complement (the n - k positions *not* kept) is coded instead,
flagged by the top bit of the first byte, so dense masks cost about n * H(k/n) bits, not n.

Two layouts of the same code, both encoded and decoded without a per-position Python loop:

- sectioned (`encode_positions`, the sparse codecs' side headers): the unary quotients and the
  b-bit remainders in two separate bit sections,

    flags|b (u8) | unary section: q_i ones then a zero, per gap, padded to a byte | remainders (b bits each), padded

- interleaved (`encode_interleaved`, inside the `ae` stage's bit stream): per gap its unary
  quotient, a zero, then its b remainder bits; the caller stores b. Decoding finds where each
  code word starts by pointer doubling over "the code word starting at bit p ends at bit e(p)".

Measured (tests/codecs/test_positions.py): 0.5-3 % above log2 C(n, k) for n = 1e5..1e6 and
k/n = 0.1 %..90 %; the absolute overhead is the header byte plus up to two padding bytes.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import CodecError

MAX_RICE = 30
COMPLEMENT = 0x80


def rice_parameter(n: int, k: int) -> int:
    """The Rice parameter for k positions spread uniformly over n (geometric gaps)."""
    if k <= 0 or n <= k:
        return 0
    mean_gap = (n - k) / k
    return max(0, min(MAX_RICE, int(round(math.log2(max(mean_gap * math.log(2), 1.0))))))


def best_rice_parameter(gaps: np.ndarray, n: int) -> int:
    """The Rice parameter that codes these gaps in the fewest bits: the uniform guess or a neighbour."""
    k = gaps.size
    guess = rice_parameter(n, k)
    candidates = range(max(0, guess - 1), min(MAX_RICE, guess + 1) + 1)
    return min(candidates, key=lambda c: k * c + int((gaps >> c).sum()))  # unary + remainder bits, exact


def _gaps(idx: np.ndarray, n: int) -> np.ndarray:
    gaps = np.diff(idx, prepend=np.int64(-1)) - 1
    if idx.size and (gaps.min() < 0 or idx[-1] >= n):
        raise CodecError("positions must be strictly increasing, non-negative and below n")
    return gaps


def _rice(gaps: np.ndarray, b: int) -> list[bytes]:
    k = gaps.size
    q = gaps >> b
    unary = np.ones(int(q.sum()) + k, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0  # each gap's quotient ends with a zero
    parts = [np.packbits(unary).tobytes()]
    if b and k:
        rem = np.empty((k, b), dtype=np.uint8)
        for j in range(b):  # loop over bit planes, not elements
            rem[:, j] = (gaps >> (b - 1 - j)) & 1
        parts.append(np.packbits(rem.reshape(-1)).tobytes())
    return parts


def encode_positions(idx: np.ndarray, n: int) -> bytes:
    """Strictly increasing positions in [0, n) -> bytes."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    _gaps(idx, n)  # validates
    flags = 0
    if 2 * idx.size > n:  # code the complement
        mask = np.ones(n, dtype=bool)
        mask[idx] = False
        idx = np.flatnonzero(mask).astype(np.int64)
        flags = COMPLEMENT
    k = idx.size
    if k == 0:
        return bytes([flags])
    gaps = _gaps(idx, n)
    b = best_rice_parameter(gaps, n)
    return b"".join([bytes([flags | b]), *_rice(gaps, b)])


def _decode_rice(data: bytes, k: int, b: int, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    zeros = np.flatnonzero(bits == 0)
    if zeros.size < k:
        raise CodecError("positions: truncated")
    zeros = zeros[:k].astype(np.int64)
    unary_end = int(zeros[-1]) + 1
    rem_start = -(-unary_end // 8) * 8
    if rem_start // 8 + -(-(k * b) // 8) != len(data):
        raise CodecError("positions: length does not match the declared count")
    q = np.diff(zeros, prepend=np.int64(-1)) - 1
    # The quotients alone already fix a lower bound on the last position: refuse before summing.
    if (int(q.sum()) << b) + k > n:
        raise CodecError(f"positions: coded positions run past n = {n}")
    gaps = q << b
    for j in range(b):
        gaps += bits[rem_start + j : rem_start + k * b : b].astype(np.int64) << (b - 1 - j)
    positions = np.cumsum(gaps + 1) - 1
    if positions[-1] >= n:
        raise CodecError(f"positions: position {int(positions[-1])} outside [0, {n})")
    return positions


def decode_positions(data: bytes, n: int, k: int) -> np.ndarray:
    """Inverse of encode_positions; CodecError on anything that is not exactly k positions in [0, n)."""
    if not data:
        raise CodecError("positions: empty")
    if k < 0 or k > n:
        raise CodecError(f"positions: {k} positions out of {n} is impossible")
    head = data[0]
    complement, b = bool(head & COMPLEMENT), head & ~COMPLEMENT
    if b > MAX_RICE:
        raise CodecError(f"positions: Rice parameter {b} out of range")
    coded = n - k if complement else k
    if coded == 0:
        if len(data) != 1 or b:
            raise CodecError("positions: trailing bytes")
        idx = np.zeros(0, dtype=np.int64)
    else:
        idx = _decode_rice(data[1:], coded, b, n)
    if not complement:
        return idx
    mask = np.ones(n, dtype=bool)
    mask[idx] = False
    return np.flatnonzero(mask).astype(np.int64)


# -- the interleaved layout -------------------------------------------------------------------------
def encode_interleaved(idx: np.ndarray, n: int) -> tuple[int, np.ndarray]:
    """(b, bits): strictly increasing positions in [0, n) as interleaved Rice code words (uint8 0/1)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    gaps = _gaps(idx, n)
    if idx.size == 0:
        return 0, np.zeros(0, np.uint8)
    b = best_rice_parameter(gaps, n)
    q = gaps >> b
    lengths = q + 1 + b
    starts = np.cumsum(lengths) - lengths
    bits = np.zeros(int(lengths.sum()), np.uint8)
    total_q = int(q.sum())
    if total_q:
        offsets = np.arange(total_q) - np.repeat(np.cumsum(q) - q, q)
        bits[np.repeat(starts, q) + offsets] = 1
    if b:
        shifts = np.arange(b - 1, -1, -1)
        rem = ((gaps[:, None] >> shifts) & 1).astype(np.uint8)
        bits[((starts + q + 1)[:, None] + np.arange(b)).reshape(-1)] = rem.reshape(-1)
    return b, bits


def decode_interleaved(
    bits: np.ndarray, start: int, k: int, b: int, n: int, who: str
) -> tuple[np.ndarray, int]:
    """k positions in [0, n) from the interleaved code words at bits[start:]; returns (positions, end).

    CodecError when the code words run past the bits or a position falls outside [0, n)."""
    if b > MAX_RICE:
        raise CodecError(f"{who}: Rice parameter {b} out of range")
    if k == 0:
        return np.zeros(0, dtype=np.int64), start
    seg = np.asarray(bits[start:], dtype=np.uint8)
    length = seg.size
    zeros = np.flatnonzero(seg == 0)
    # For every bit p (and the sentinel p = length): the first zero at or after it, and so where a
    # code word starting at p ends. The sentinel maps to itself, so a walk that runs out stays there.
    next_zero = np.append(zeros, length)[np.searchsorted(zeros, np.arange(length + 1))]
    ends = next_zero + 1 + b
    jump = np.minimum(ends, length)
    word_starts = np.zeros(1, dtype=np.int64)
    while word_starts.size < k:  # pointer doubling: starts at distances 0..2m-1 from the first
        word_starts = np.concatenate([word_starts, jump[word_starts]])
        jump = jump[jump]
    word_starts = word_starts[:k]
    if int(word_starts[-1]) >= length or int(ends[word_starts[-1]]) > length:
        raise CodecError(f"{who}: position stream truncated")
    q = next_zero[word_starts] - word_starts
    gaps = q << b
    if b:
        rem = seg[(next_zero[word_starts] + 1)[:, None] + np.arange(b)].astype(np.int64)
        gaps += rem @ (np.int64(1) << np.arange(b - 1, -1, -1, dtype=np.int64))
    positions = np.cumsum(gaps + 1) - 1
    if int(positions[-1]) >= n:
        raise CodecError(f"{who}: position {int(positions[-1])} outside [0, {n})")
    return positions, start + int(ends[word_starts[-1]])
