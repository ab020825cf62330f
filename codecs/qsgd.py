"""`qsgd`: QSGD (Alistarh et al. 2017), `levels` s, scaled by the norm, stochastic and unbiased.

Chain syntax: `qsgd:4`, `qsgd:8,bucket=0,per_layer=true`, `qsgd:4,seed=1`.

Each entry becomes sign(x) * l / s * ||x|| with l in {0..s} drawn so that E[x_hat] = x: with
r = s |x| / ||x||, l = floor(r) + 1 with probability r - floor(r). So |x - x_hat| < ||x|| / s
per entry. The norm is taken per bucket of `bucket` consecutive entries, as in the paper: the
variance grows with the bucket's dimension, so a norm over millions of entries would round
almost everything to zero. `bucket=0` uses one norm per layer (`per_layer=true`, dense model
only; without a layout the input is one bucket) or one for the whole input.

The rounding seed is fresh OS randomness per message, or with `seed` set a hash of (seed, input)
(reproducible; see `quantize`). Only the sender uses it; the header carries it for auditing.
Norms are float32; an input whose norm exceeds float32 is refused with CodecError.

side: u32 seed | f32 norm per bucket
y:    symbols sign * l in [-s, s] (int8 for s <= 127, else int16)
"""

from __future__ import annotations

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
from .quantize import check_seed, group_bounds, message_seed, segment_ids


@register_codec
@dataclass
class QSGD(Codec):
    levels: int = 4
    bucket: int = 512
    per_layer: bool = False
    seed: int | None = None

    codec_id: ClassVar[str] = "qsgd"
    positional: ClassVar[tuple[str, ...]] = ("levels",)

    def __post_init__(self) -> None:
        if not isinstance(self.levels, int) or isinstance(self.levels, bool) or not 1 <= self.levels <= 32767:
            raise CodecError(f"qsgd: levels must be an integer in [1, 32767], got {self.levels!r}")
        if not isinstance(self.bucket, int) or isinstance(self.bucket, bool) or self.bucket < 0:
            raise CodecError(f"qsgd: bucket must be a non-negative integer, got {self.bucket!r}")
        if not isinstance(self.per_layer, bool):
            raise CodecError(f"qsgd: per_layer must be true or false, got {self.per_layer!r}")
        check_seed("qsgd", self.seed)

    def _bounds(self, spec: ArraySpec) -> np.ndarray:
        if self.bucket:
            return np.asarray(np.append(np.arange(0, spec.count, self.bucket, dtype=np.int64), spec.count))
        return group_bounds(spec, "layer" if self.per_layer else "tensor", "qsgd")

    @property
    def _dtype(self) -> type:
        return np.int8 if self.levels <= 127 else np.int16

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = require_array_spec(spec, "qsgd")
        arr = s.check(x, "qsgd input").astype(np.float32, copy=False)
        bounds = self._bounds(s)
        starts = bounds[:-1]
        if arr.size:
            sq = np.add.reduceat(arr.astype(np.float64) ** 2, starts)
        else:
            sq = np.zeros(len(starts))
        norms64 = np.sqrt(sq)
        if not (norms64 <= np.finfo(np.float32).max).all():
            raise CodecError("qsgd: a bucket's norm exceeds float32; scale the input down")
        norms = norms64.astype(np.float32)
        seg = segment_ids(bounds)
        safe = np.where(norms > 0, norms, np.float32(1)).astype(np.float64)
        r = np.abs(arr) / safe[seg] * self.levels
        seed = message_seed(self.seed, arr)
        low = np.floor(r)
        level = low + (np.random.default_rng(seed).random(arr.size) < (r - low))
        symbols = (np.sign(arr) * np.minimum(level, self.levels)).astype(self._dtype)
        return SideWriter().u32(seed).array(norms).getvalue(), symbols

    def _read(self, spec: Spec, side: bytes) -> tuple[ArraySpec, np.ndarray, np.ndarray]:
        s = require_array_spec(spec, "qsgd")
        bounds = self._bounds(s)
        r = SideReader(side, "qsgd")
        r.u32()  # the sender's seed: informational
        norms = r.array(np.float32, len(bounds) - 1)
        r.finish()
        if not np.isfinite(norms).all() or (norms < 0).any():
            raise CodecError("qsgd: norms are not finite and non-negative")
        return s, bounds, norms

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        s, _, _ = self._read(spec, side)
        return ArraySpec(self._dtype, s.count, symbols=(-self.levels, self.levels))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        s, bounds, norms = self._read(spec, side)
        scale = norms / np.float32(self.levels)  # float32 arithmetic: |x_hat| <= norm, no overflow
        return np.asarray((np.asarray(y).astype(np.float32) * scale[segment_ids(bounds)]).astype(s.dtype))
