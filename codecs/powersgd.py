"""`powersgd`: rank-r PowerSGD compression (Vogels et al. 2019) of every matrix in the model.

Each tensor with two or more dimensions is viewed as a matrix M (out, in * kernel) and sent as
P (out, r) and Q (in, r) with M ~ P Q^T. One power iteration per message, warm-started from the
previous Q: consecutive updates are similar, so reusing Q makes one cheap iteration about as
good as many (the paper's key trick). P is orthogonalised so the projection is well conditioned.
Vectors (biases) and matrices where r * (out + in) >= out * in pass through as float32.

Warm start needs the same Q on both sides only for the sender; the receiver rebuilds M from P and
Q, which both travel. Pair it with error feedback (`ef | powersgd:2`), as the paper does, so the
part outside the rank-r subspace is sent later rather than lost.

y: float32 concatenation, per tensor in layout order: P then Q (compressed) or the tensor (passed).
State (sender only): `q/<tensor index>` warm-start factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import ArraySpec, Codec, Data, Spec, StageState, register_codec, require_array_spec
from .errors import CodecError
from .layout import Layout


def _plan(layout: Layout, rank: int) -> list[tuple[int, int, int, bool]]:
    """Per tensor: (offset, rows, cols, compressed)."""
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

    def _layout(self, spec: Spec) -> Layout:
        s = require_array_spec(spec, "powersgd", dense_model=True)
        assert s.layout is not None
        return s.layout

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
            q = state.get(f"q/{i}")
            if q is None or q.shape != (cols, self.rank):
                # A random start: any full-rank Q works, and the next messages refine it.
                q = np.random.default_rng([self.seed, i]).standard_normal((cols, self.rank)).astype(np.float32)
            p = m @ q
            p, _ = np.linalg.qr(p)  # orthonormal columns: the projection P P^T M is then exact in span(P)
            q = m.T @ p
            state[f"q/{i}"] = q.astype(np.float32)  # warm start for the next message (sender only)
            parts += [p.astype(np.float32).reshape(-1), q.astype(np.float32).reshape(-1)]
        return b"", np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        if side:
            raise CodecError("powersgd: unexpected header bytes")
        return ArraySpec(np.float32, _output_count(self._layout(spec), self.rank))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState) -> Data:
        layout = self._layout(spec)
        s = require_array_spec(spec, "powersgd")
        flat = np.asarray(y, dtype=np.float32)
        out = np.empty(s.count, dtype=s.dtype)
        pos = 0
        for offset, rows, cols, compress in _plan(layout, self.rank):
            if not compress:
                out[offset : offset + rows * cols] = flat[pos : pos + rows * cols]
                pos += rows * cols
                continue
            p = flat[pos : pos + rows * self.rank].reshape(rows, self.rank)
            pos += rows * self.rank
            q = flat[pos : pos + cols * self.rank].reshape(cols, self.rank)
            pos += cols * self.rank
            out[offset : offset + rows * cols] = (p @ q.T).reshape(-1)
        if not math.isfinite(float(np.sum(np.abs(out)))):
            raise CodecError("powersgd: factors overflow")
        return out
