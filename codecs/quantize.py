"""`quantize`: uniform quantization to 1, 2, 4 or 8 bits (seed 003), per tensor, layer or channel.

Chain syntax: `quantize:4`, `quantize:8,granularity=channel`, `quantize:2,rounding=stochastic,seed=7`.

Each group gets its own grid lo + q * step, q in [0, 2**bits - 1], with lo = min and
step = (max - min) / (2**bits - 1) of the group. Groups (`granularity`):
- "tensor" (default): the whole input as one group;
- "layer": one group per layer tensor;
- "channel": one group per output channel (the first dimension of every tensor with two or more
  dimensions; a bias or other 1-D tensor is one group).
"layer" and "channel" need the layout, which the input has while it is the dense model. After a
sparsifying stage (`topk:0.01 | quantize:4`) the input is a plain vector of kept values and is
quantized as one group, on both sides alike.

Bounds (documented and tested):
- nearest rounding: |x - x_hat| <= step / 2 + 2**-22 * max|x| over the group (half a step,
  plus the float32 rounding of x_hat = lo + q * step); the encoder rounds in float64 and the
  transmitted float32 step is rounded up (at most one ulp above (max - min) / (2**bits - 1)), so
  the grid covers [min, max] and nothing is clipped;
- stochastic rounding: |x - x_hat| < step (+ the same float32 term), and E[x_hat] = x.
Inputs whose group range max - min exceeds float32 (|x| ~ 1e38) are refused with CodecError.

Stochastic rounding draws its uniforms from a per-message seed: fresh OS randomness by default,
or, with `seed` set, a hash of (seed, the input bytes), so a run is reproducible and the same
input with another seed rounds independently. The receiver needs no seed at all (rounding
happens on the sender only); the header carries it so a message can be audited or replayed.

side: u8 flags (1: stochastic) | u32 seed (stochastic only) | per group: f32 lo, f32 step
      (float32: 8 bytes per group, so "channel" costs 8 bytes per output channel)
y:    uint8 symbols in [0, 2**bits - 1] (bit-packed by `raw`, or coded by a following `entropy`)
"""

from __future__ import annotations

import os
import zlib
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

F32_MAX = float(np.finfo(np.float32).max)


def group_bounds(spec: ArraySpec, granularity: str, who: str) -> np.ndarray:
    """Start offsets of contiguous groups, plus the end, for "tensor", "layer" or "channel".

    Without a layout (input after a sparsifier) every granularity is one group. Empty tensors
    form no group.
    """
    if granularity == "tensor" or spec.layout is None:
        return np.array([0, spec.count], dtype=np.int64)
    if granularity not in ("layer", "channel"):
        raise CodecError(f"{who}: unknown granularity {granularity!r}")
    starts: list[np.ndarray] = []
    for t, sl in spec.layout.slices():
        if t.numel == 0:
            continue
        if granularity == "channel" and len(t.shape) >= 2:
            starts.append(np.arange(sl.start, sl.stop, t.numel // t.shape[0], dtype=np.int64))
        else:
            starts.append(np.array([sl.start], dtype=np.int64))
    return np.concatenate([*starts, np.array([spec.count], dtype=np.int64)])


def segment_ids(bounds: np.ndarray) -> np.ndarray:
    """The group index of every entry."""
    return np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))


def message_seed(seed: int | None, arr: np.ndarray) -> int:
    """A 32-bit seed for one message: OS randomness, or a hash of (seed, input) when seeded."""
    if seed is None:
        return int.from_bytes(os.urandom(4), "little")
    digest = zlib.crc32(np.ascontiguousarray(arr).tobytes())
    return int(np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, digest]).integers(1 << 32))


def check_seed(who: str, seed: object) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 64):
        raise CodecError(f"{who}: seed must be null or an integer in [0, 2**64), got {seed!r}")


@register_codec
@dataclass
class Quantize(Codec):
    bits: int = 8
    granularity: str = "tensor"  # tensor | layer | channel
    rounding: str = "nearest"  # nearest | stochastic
    seed: int | None = None  # stochastic rounding: None = fresh randomness per message

    codec_id: ClassVar[str] = "quantize"
    positional: ClassVar[tuple[str, ...]] = ("bits",)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (1, 2, 4, 8):
            raise CodecError(f"quantize: bits must be 1, 2, 4 or 8, got {self.bits!r}")
        if self.granularity not in ("tensor", "layer", "channel"):
            raise CodecError(f"quantize: granularity must be tensor, layer or channel, got {self.granularity!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise CodecError(f"quantize: rounding must be nearest or stochastic, got {self.rounding!r}")
        check_seed("quantize", self.seed)

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = require_array_spec(spec, "quantize")
        arr = s.check(x, "quantize input").astype(np.float32, copy=False)
        bounds = group_bounds(s, self.granularity, "quantize")
        starts = bounds[:-1]
        if arr.size:
            lo = np.minimum.reduceat(arr, starts).astype(np.float64)
            hi = np.maximum.reduceat(arr, starts).astype(np.float64)
        else:
            lo = hi = np.zeros(len(starts))
        step64 = (hi - lo) / self.levels
        with np.errstate(over="ignore"):  # a range beyond float32 becomes inf: refused just below
            step32 = step64.astype(np.float32)
            # Round the step up, never down, so the grid's top lo + levels * step reaches max.
            step32 = np.where(step32 < step64, np.nextafter(step32, np.float32(np.inf)), step32)
        if not np.isfinite(step32).all() or (hi - lo > F32_MAX).any():
            raise CodecError("quantize: a group's value range (max - min) exceeds float32; scale the input down")
        lo32 = lo.astype(np.float32)  # exact: lo is a float32 input value
        # The grid both sides use is lo32 + q * step32; round onto that grid, in float64.
        step = step32.astype(np.float64)
        seg = segment_ids(bounds)
        scaled = (arr - lo[seg]) / np.where(step > 0, step, 1.0)[seg]
        w = SideWriter().u8(1 if self.rounding == "stochastic" else 0)
        if self.rounding == "stochastic":
            seed = message_seed(self.seed, arr)
            w.u32(seed)
            scaled = np.floor(scaled + np.random.default_rng(seed).random(arr.size))
        else:
            scaled = np.rint(scaled)
        q = np.clip(scaled, 0, self.levels).astype(np.uint8)
        w.array(np.stack([lo32, step32], axis=1).reshape(-1))
        return w.getvalue(), q

    def _read(self, spec: Spec, side: bytes) -> tuple[ArraySpec, np.ndarray, np.ndarray, np.ndarray]:
        s = require_array_spec(spec, "quantize")
        bounds = group_bounds(s, self.granularity, "quantize")
        r = SideReader(side, "quantize")
        flags = r.u8()
        if flags not in (0, 1) or flags != (self.rounding == "stochastic"):
            raise CodecError("quantize: header flags do not match the configured rounding")
        if flags:
            r.u32()  # the sender's seed: informational
        groups = len(bounds) - 1
        params = r.array(np.float32, 2 * groups).reshape(groups, 2)
        r.finish()
        lo, step = params[:, 0], params[:, 1]
        if not np.isfinite(params).all() or (step < 0).any():
            raise CodecError("quantize: group parameters are not finite and non-negative")
        top = lo.astype(np.float64) + self.levels * step.astype(np.float64)
        if (self.levels * step.astype(np.float64) > F32_MAX).any() or (np.abs(top) > F32_MAX).any():
            raise CodecError("quantize: group range reaches beyond float32")
        return s, bounds, lo, step

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        s, *_ = self._read(spec, side)
        return ArraySpec(np.uint8, s.count, symbols=(0, self.levels))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        s, bounds, lo, step = self._read(spec, side)
        seg = segment_ids(bounds)
        # float32, as in every release: the ranges were checked above, so nothing overflows.
        return (lo[seg] + np.asarray(y).astype(np.float32) * step[seg]).astype(s.dtype)
