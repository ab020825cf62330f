"""`powersgd`: rank-r PowerSGD compression (Vogels et al. 2019) of every matrix in the model.

Chain syntax: `powersgd:2` (rank 2), `powersgd:rank=4,seed=1`; with error feedback, as in the
paper: `ef | powersgd:2`.

Each tensor with two or more dimensions is viewed as a matrix M of shape (out, in * kernel), a
conv weight reshaped to (out, -1) as in PyTorch's PowerSGD hook, and sent as factors P (out, r)
and Q (in * kernel, r) with M ~ P Q^T. Per message, one step of subspace (power) iteration:

    P = M Q_prev            project onto the subspace found last time
    P = orthonormalise(P)   QR: without it the r columns of P would all collapse onto the top
                            singular vector, and P P^T would not be a projection
    Q = M^T P               so P Q^T = P P^T M, the best approximation of M within span(P)

Warm start: Q_prev is the Q of the previous message. Consecutive updates are similar, so one
iteration per message, continued across messages, tracks the top-r subspace about as well as
many iterations from scratch would (the paper's key trick; a rank-r matrix is recovered exactly
from the first message on). Both P and Q travel, so decoding needs no state; but Q_prev is kept
on BOTH sides, taken in `update` from the factors as the receiver decodes them (`y_hat`, which
equals `y` unless a lossy stage such as fp16 follows), so sender and receiver states stay
identical and checkable with `CodecState.fingerprint`. A message skipped by both sides leaves
both states untouched. Before the first message, or when a stored Q has the wrong shape (the
layout changed), Q_prev is drawn from a normal distribution seeded by (`seed`, tensor index);
a column of Q_prev that is all zero (M was zero along it) is redrawn the same way, and columns
are normalised first, which leaves span(P) unchanged but keeps M Q_prev from overflowing.

Tensors that would not shrink, where r * (out + in) >= out * in, and vectors (biases, 1-D
tensors, scalars) pass through as float32, unchanged. Pair it with error feedback
(`ef | powersgd:2`), as the paper does, so the part outside the rank-r subspace is sent later
rather than lost.

side: none.
y:    float32 concatenation, per tensor in layout order: P then Q (compressed) or the tensor
      itself (passed through).
State (both sides): `q/<tensor index>`, the last transmitted Q of each compressed tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import (
    ArraySpec,
    Codec,
    Data,
    Spec,
    StageState,
    StageUpdate,
    register_codec,
    require_array_spec,
)
from .errors import CodecError
from .layout import Layout


def _plan(layout: Layout, rank: int) -> list[tuple[int, int, int, bool]]:
    """Per tensor in layout order: (offset, rows, cols, compressed)."""
    out = []
    offset = 0
    for t in layout:
        rows = t.shape[0] if t.shape else 1
        cols = t.numel // rows if rows else 0
        compress = len(t.shape) >= 2 and rank * (rows + cols) < rows * cols
        out.append((offset, rows, cols, compress))
        offset += t.numel
    return out


def _output_count(layout: Layout, rank: int) -> int:
    return sum(rank * (r + c) if comp else r * c for _, r, c, comp in _plan(layout, rank))


def _factors(
    flat: np.ndarray, plan: list[tuple[int, int, int, bool]], rank: int
) -> Iterator[tuple[int, int, int, int, np.ndarray, np.ndarray | None]]:
    """Walk the transmitted vector: (tensor index, offset, rows, cols, P, Q) or (..., tensor, None)."""
    pos = 0
    for i, (offset, rows, cols, compress) in enumerate(plan):
        if not compress:
            yield i, offset, rows, cols, flat[pos : pos + rows * cols], None
            pos += rows * cols
            continue
        p = flat[pos : pos + rows * rank].reshape(rows, rank)
        pos += rows * rank
        q = flat[pos : pos + cols * rank].reshape(cols, rank)
        pos += cols * rank
        yield i, offset, rows, cols, p, q


@register_codec
@dataclass
class PowerSGD(Codec):
    rank: int = 2
    seed: int = 0

    codec_id: ClassVar[str] = "powersgd"
    positional: ClassVar[tuple[str, ...]] = ("rank",)
    stateful: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= 1024:
            raise CodecError(f"powersgd: rank must be an integer in [1, 1024], got {self.rank!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 1 << 32:
            raise CodecError(f"powersgd: seed must be an integer in [0, 2**32), got {self.seed!r}")

    def _layout(self, spec: Spec) -> Layout:
        s = require_array_spec(spec, "powersgd", dense_model=True)
        assert s.layout is not None
        return s.layout

    def _warm_start(self, state: StageState, index: int, cols: int) -> np.ndarray:
        """Q_prev for tensor `index`, columns normalised; random where there is nothing usable."""
        q = state.get(f"q/{index}")
        fresh = (
            np.random.default_rng([self.seed, index]).standard_normal((cols, self.rank)).astype(np.float32)
        )
        if q is None or q.shape != (cols, self.rank) or not np.isfinite(q).all():
            q = fresh
        norms = np.linalg.norm(q.astype(np.float64), axis=0)
        q = np.where(norms > 0, q / np.where(norms > 0, norms, 1.0), fresh).astype(np.float32)
        return q

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        layout = self._layout(spec)
        arr = require_array_spec(spec, "powersgd").check(x, "powersgd input")
        parts: list[np.ndarray] = []
        for i, (offset, rows, cols, compress) in enumerate(_plan(layout, self.rank)):
            block = arr[offset : offset + rows * cols]
            if not compress:
                parts.append(block.astype(np.float32))
                continue
            m = block.reshape(rows, cols).astype(np.float32)
            p = m @ self._warm_start(state, i, cols)
            # Reduced QR gives orthonormal columns even when M Q_prev is rank-deficient
            # (Householder completes the basis), so P P^T is always a projection.
            p, _ = np.linalg.qr(p)
            q = m.T @ p
            parts += [p.astype(np.float32).reshape(-1), q.astype(np.float32).reshape(-1)]
        y = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if not np.isfinite(y).all():
            raise CodecError("powersgd: factors overflow float32; scale the input down")
        return b"", y

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        if side:
            raise CodecError("powersgd: unexpected header bytes")
        return ArraySpec(np.float32, _output_count(self._layout(spec), self.rank))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        layout = self._layout(spec)
        s = require_array_spec(spec, "powersgd")
        flat = np.asarray(y, dtype=np.float32)
        out = np.empty(s.count, dtype=s.dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # corrupt factors: refused just below
            for _, offset, rows, cols, p, q in _factors(flat, _plan(layout, self.rank), self.rank):
                out[offset : offset + rows * cols] = p.reshape(-1) if q is None else (p @ q.T).reshape(-1)
        if not np.isfinite(out).all():
            raise CodecError("powersgd: decoded factors are not finite")
        return out

    def update(self, state: StageState, event: StageUpdate) -> None:
        # Both sides: keep the Q each compressed tensor was sent with, as the receiver decoded it.
        layout = self._layout(event.spec)
        flat = np.asarray(event.y_hat, dtype=np.float32)
        for i, _, _, _, _, q in _factors(flat, _plan(layout, self.rank), self.rank):
            if q is not None:
                state[f"q/{i}"] = np.ascontiguousarray(q, dtype=np.float32)
