"""`qsgd`: QSGD (Alistarh et al. 2017), `levels` s, scaled by the norm, stochastic and unbiased.

Each entry becomes sign(x) * l / s * ||x|| with l in {0..s} drawn so that E[x_hat] = x. The norm
is taken per bucket of `bucket` consecutive entries, as in the paper: the variance grows with the
bucket's dimension, so a norm over millions of entries would round almost everything to zero.
`bucket=0` uses one norm per layer (`per_layer`, dense model) or for the whole input. The seed
travels in the header.

side: u32 seed | f32 norm per bucket
y:    symbols sign * l in [-s, s]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import (
    ArraySpec,
    Codec,
    Data,
    SideReader,
    SideWriter,
    Spec,
    StageState,
    register_codec,
    require_array_spec,
)
from .errors import CodecError
from .quantize import group_bounds, segment_ids


@register_codec
@dataclass
class QSGD(Codec):
    levels: int = 4
    bucket: int = 512
    per_layer: bool = False

    codec_id: ClassVar[str] = "qsgd"
    positional: ClassVar[tuple[str, ...]] = ("levels",)

    def __post_init__(self) -> None:
        if not isinstance(self.levels, int) or isinstance(self.levels, bool) or not 1 <= self.levels <= 32767:
            raise CodecError(f"qsgd: levels must be an integer in [1, 32767], got {self.levels!r}")
        if not isinstance(self.bucket, int) or isinstance(self.bucket, bool) or self.bucket < 0:
            raise CodecError(f"qsgd: bucket must be a non-negative integer, got {self.bucket!r}")

    def _bounds(self, spec: ArraySpec) -> np.ndarray:
        if self.bucket:
            return np.append(np.arange(0, spec.count, self.bucket, dtype=np.int64), spec.count)
        return group_bounds(spec, "layer" if self.per_layer else "tensor", "qsgd")

    @property
    def _dtype(self) -> type:
        return np.int8 if self.levels <= 127 else np.int16

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = require_array_spec(spec, "qsgd")
        arr = s.check(x, "qsgd input").astype(np.float32, copy=False)
        bounds = self._bounds(s)
        sq = np.add.reduceat(arr.astype(np.float64) ** 2, bounds[:-1]) if arr.size else np.zeros(len(bounds) - 1)
        norms = np.sqrt(sq).astype(np.float32)
        seg = segment_ids(bounds)
        safe = np.where(norms > 0, norms, np.float32(1))
        r = np.abs(arr) / safe[seg] * np.float32(self.levels)
        seed = int.from_bytes(os.urandom(4), "little")
        low = np.floor(r)
        level = low + (np.random.default_rng(seed).random(arr.size, dtype=np.float32) < (r - low))
        symbols = (np.sign(arr) * np.minimum(level, self.levels)).astype(self._dtype)
        return SideWriter().u32(seed).array(norms).getvalue(), symbols

    def _read(self, spec: Spec, side: bytes) -> tuple[ArraySpec, np.ndarray, np.ndarray]:
        s = require_array_spec(spec, "qsgd")
        bounds = self._bounds(s)
        r = SideReader(side, "qsgd")
        r.u32()
        norms = r.array(np.float32, len(bounds) - 1)
        r.finish()
        if not np.isfinite(norms).all() or (norms < 0).any():
            raise CodecError("qsgd: norms are not finite and non-negative")
        return s, bounds, norms

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        s, _, _ = self._read(spec, side)
        return ArraySpec(self._dtype, s.count, symbols=(-self.levels, self.levels))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState) -> Data:
        s, bounds, norms = self._read(spec, side)
        scale = norms / np.float32(self.levels)
        return (np.asarray(y).astype(np.float32) * scale[segment_ids(bounds)]).astype(s.dtype)
