"""Sorted positions coded close to the information bound log2 C(n, k): Golomb-Rice coding of gaps.

Gaps between k positions spread over n are near-geometric, and a Rice code with parameter
b ~ log2(ln 2 * mean gap) is within a few percent of their entropy. The unary quotients and the
b-bit remainders are stored as two separate bit sections so that both encoding and decoding are
vectorised (no per-position Python loop):

    b (u8) | unary section: q_i ones then a zero, per gap, padded to a byte | k * b remainder bits, padded
"""

from __future__ import annotations

import math

import numpy as np

from .errors import CodecError


def rice_parameter(n: int, k: int) -> int:
    if k <= 0 or n <= k:
        return 0
    mean_gap = (n - k) / k
    return max(0, min(30, int(round(math.log2(max(mean_gap * math.log(2), 1.0))))))


def encode_positions(idx: np.ndarray, n: int) -> bytes:
    """Strictly increasing positions in [0, n) -> bytes."""
    idx = np.asarray(idx, dtype=np.int64)
    k = idx.size
    b = rice_parameter(n, k)
    if k == 0:
        return bytes([b])
    gaps = np.diff(np.concatenate([np.array([-1], np.int64), idx])) - 1
    if gaps.min() < 0 or idx[-1] >= n:
        raise CodecError("positions must be strictly increasing and below n")
    q = gaps >> b
    unary = np.ones(int(q.sum()) + k, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0  # each gap's quotient ends with a zero
    parts = [bytes([b]), np.packbits(unary).tobytes()]
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        rem = ((gaps[:, None] >> shifts) & 1).astype(np.uint8)
        parts.append(np.packbits(rem.reshape(-1)).tobytes())
    return b"".join(parts)


def decode_positions(data: bytes, n: int, k: int) -> np.ndarray:
    """Inverse of encode_positions; CodecError on anything that is not exactly k positions in [0, n)."""
    if not data:
        raise CodecError("positions: empty")
    if k < 0 or k > n:
        raise CodecError(f"positions: {k} positions out of {n} is impossible")
    b = data[0]
    if b > 30:
        raise CodecError(f"positions: Rice parameter {b} out of range")
    if k == 0:
        if len(data) != 1:
            raise CodecError("positions: trailing bytes")
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=1))
    zeros = np.flatnonzero(bits == 0)
    if zeros.size < k:
        raise CodecError("positions: truncated")
    unary_end = int(zeros[k - 1]) + 1
    rem_start = -(-unary_end // 8) * 8
    rem_bytes = -(-(k * b) // 8)
    if rem_start // 8 + rem_bytes != len(data) - 1:
        raise CodecError("positions: length does not match the declared count")
    q = np.diff(np.concatenate([np.array([-1], np.int64), zeros[:k].astype(np.int64)])) - 1
    gaps = q << b
    if b:
        rem = bits[rem_start : rem_start + k * b].reshape(k, b).astype(np.int64)
        gaps += rem @ (1 << np.arange(b - 1, -1, -1, dtype=np.int64))
    positions = np.cumsum(gaps + 1) - 1
    if positions[-1] >= n:
        raise CodecError(f"positions: position {int(positions[-1])} outside [0, {n})")
    return positions
