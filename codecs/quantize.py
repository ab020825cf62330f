"""`quantize`: uniform quantization to 1, 2, 4 or 8 bits per tensor, layer or channel, on a grid with zero (seed 003: min-max).

Chain syntax: `quantize:4`, `quantize:8,granularity=channel`, `quantize:4,clip=mse`,
`quantize:2,rounding=stochastic,seed=7`, `quantize:4,grid=minmax` (seed 003's quantizer).

Groups (`granularity`), each with its own grid:
- "tensor" (default): the whole input as one group;
- "layer": one group per layer tensor;
- "channel": one group per output channel (the first dimension of every tensor with two or more
  dimensions; a bias or other 1-D tensor is one group).
"layer" and "channel" need the layout, which the input has while it is the dense model. After a
sparsifying stage (`topk:0.01 | quantize:4`) the input is a plain vector of kept values and is
quantized as one group, on both sides alike.

Grids (`grid`):
- "zero": x_hat = (q - z) * step, q in [0, 2**bits - 1], z = 2**(bits - 1) - 1, so zero is a level
  and the levels run from -z * step to (z + 1) * step (step < 0 mirrors them, for a group whose
  negative side is the larger). Without clipping, step = max(larger side / (z + 1), smaller side / z)
  covers the group. A dense update is mostly near zero with heavy tails; a grid without zero rounds
  all of it to levels far from it (seed 003's min-max grid: NMSE 6.0 on the 11M-parameter update at
  4 bits, worse than sending zeros). With zero on the grid nearest rounding never moves an entry
  further than |x| from itself, so NMSE <= 1 (plus float32 rounding of x_hat).
- "minmax" (seed 003): x_hat = lo + q * step with lo = min and step = (max - min) / (2**bits - 1).
- "auto" (default): "zero" on the dense model (an input with a layout), "minmax" on the kept values
  of a sparsifier (no layout): those keep away from zero (top-k), and min-max spends every level
  on their range. So `topk:0.01 | quantize:4` (the default uplink) is seed 003's quantizer, byte for
  byte, and `quantize:4` alone is not.

Clipping (`clip`, grid "zero"): "none" (default), or "mse": the step is chosen among
step_0 * 2**(-j/4), j = 0..32 (step_0 the step that covers the group), to minimise the expected
squared error: entries beyond the grid's ends cost (|x| - end)**2, entries that round to zero x**2,
the others step**2 / 12 (uniform rounding error); counted over the group in one histogram pass.
The chosen step is then kept only where its actual squared error is below the unclipped grid's, so
per group clip=mse is never worse than clip=none.

Bounds (documented and tested), per group with its transmitted step:
- nearest rounding, inside the grid: |x - x_hat| <= |step| / 2 + 2**-22 * max|x| over the group
  (half a step, plus the float32 rounding of x_hat); the encoder rounds in float64 and the
  transmitted float32 step is rounded up (at most one ulp above the exact one), so without
  clipping the grid covers [min, max] and nothing is clipped;
- nearest rounding, clipped (clip=mse): |x - x_hat| = |x| - end, end = (z + 1) |step| on the
  grid's long side and z |step| on the other; with grid "zero" always |x - x_hat| <= |x| (+ the
  float32 term);
- stochastic rounding: |x - x_hat| < step (+ the same float32 term) inside the grid, and E[x_hat] = x.
Inputs whose group range exceeds float32 (|x| ~ 1e38) are refused with CodecError.

Stochastic rounding draws its uniforms from a per-message seed: fresh OS randomness by default,
or, with `seed` set, a hash of (seed, the input bytes), so a run is reproducible and the same
input with another seed rounds independently. The receiver needs no seed at all (rounding
happens on the sender only); the header carries it so a message can be audited or replayed.

side: u8 flags (1: stochastic, 2: grid "zero") | u32 seed (stochastic only) | per group:
      minmax: f32 lo, f32 step (8 bytes per group, so "channel" costs 8 bytes per output channel);
      zero: f32 step (signed)
y:    uint8 symbols in [0, 2**bits - 1] (bit-packed by `raw`, or coded by a following `entropy`)
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator
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
STOCHASTIC, ZERO_GRID = 1, 2  # header flag bits
GRIDS = ("auto", "zero", "minmax")
CLIPS = ("none", "mse")
CLIP_STEPS = 33  # clip=mse tries step_0 * 2**(-j/4) for j < CLIP_STEPS


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


CHUNK = 1 << 20  # entries per pass: the float64 temporaries stay a few MiB whatever the model's size


def chunk_segments(bounds: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, group index of each entry in it) over all entries, CHUNK at a time."""
    total = int(bounds[-1]) if len(bounds) else 0
    for start in range(0, total, CHUNK):
        stop = min(start + CHUNK, total)
        yield start, stop, np.searchsorted(bounds, np.arange(start, stop), side="right") - 1


def message_seed(seed: int | None, arr: np.ndarray) -> int:
    """A 32-bit seed for one message: OS randomness, or a hash of (seed, input) when seeded."""
    if seed is None:
        return int.from_bytes(os.urandom(4), "little")
    digest = zlib.crc32(np.ascontiguousarray(arr).tobytes())
    return int(np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, digest]).integers(1 << 32))


def check_seed(who: str, seed: object) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 64):
        raise CodecError(f"{who}: seed must be null or an integer in [0, 2**64), got {seed!r}")


def _round_up_f32(step64: np.ndarray) -> np.ndarray:
    """float32 steps, never below the float64 ones (so the grid still reaches what it must cover)."""
    with np.errstate(over="ignore"):  # a range beyond float32 becomes inf: refused by the caller
        step32 = step64.astype(np.float32)
        return np.where(
            np.abs(step32) < np.abs(step64),
            np.nextafter(step32, np.where(step32 < 0, -np.inf, np.inf).astype(np.float32)),
            step32,
        )


def zero_grid_steps(arr: np.ndarray, bounds: np.ndarray, bits: int, clip: str) -> np.ndarray:
    """The signed float64 step of each group's zero-containing grid (see the module docstring)."""
    starts = bounds[:-1]
    z = (1 << (bits - 1)) - 1
    hi = (
        np.maximum(np.maximum.reduceat(arr, starts).astype(np.float64), 0)
        if arr.size
        else np.zeros(len(starts))
    )
    lo = (
        np.maximum(-np.minimum.reduceat(arr, starts).astype(np.float64), 0)
        if arr.size
        else np.zeros(len(starts))
    )
    sign = np.where(lo > hi, -1.0, 1.0)  # the long side gets the z + 1 levels
    long_side, short_side = np.maximum(hi, lo), np.minimum(hi, lo)
    step = long_side / (z + 1)
    if z:
        step = np.maximum(step, short_side / z)
    if clip == "mse" and arr.size:
        clipped = step * 2.0 ** (-_best_clip(arr, bounds, step, sign, z) / 4)
        # The model's choice, kept where the data agree: no group ends up worse than unclipped.
        seg = segment_ids(bounds)
        errors = [_squared_error(arr, seg, len(starts), sign * s, bits) for s in (step, clipped)]
        step = np.where(errors[1] < errors[0], clipped, step)
    return np.asarray(sign * step)


def _squared_error(arr: np.ndarray, seg: np.ndarray, groups: int, step: np.ndarray, bits: int) -> np.ndarray:
    """Per group, the squared error of nearest rounding onto the zero grid of these (signed) steps."""
    z = (1 << (bits - 1)) - 1
    s = np.where(step != 0, step, 1.0)[seg]
    x_hat = (np.clip(np.rint(arr / s + z), 0, (1 << bits) - 1) - z) * s
    return np.bincount(seg, weights=(arr - x_hat) ** 2, minlength=groups)


def _best_clip(
    arr: np.ndarray, bounds: np.ndarray, step0: np.ndarray, sign: np.ndarray, z: int
) -> np.ndarray:
    """Per group, the j < CLIP_STEPS whose step step0 * 2**(-j/4) has the least expected squared error.

    Candidate j clips an entry x at the end e * step_j of its side (e = z + 1 on the long side, z on the
    short one) when |x| > e * step_j, i.e. when j > -4 log2(|x| / (e * step0)); it rounds x to zero when
    |x| < step_j / 2. One histogram of those thresholds per group gives every candidate's error."""
    groups = len(bounds) - 1
    seg = segment_ids(bounds)
    mag = np.abs(arr).astype(np.float64)
    long_side = arr * sign[seg] >= 0
    ends = np.where(long_side, z + 1, z).astype(np.float64)
    j = np.arange(CLIP_STEPS)
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.log2(mag / np.where(step0 > 0, step0, 1.0)[seg])  # log2(|x| / step0); -inf at 0
        # clipped for j >= this
        clip_at = np.floor(4 * (np.where(long_side, math.log2(z + 1), math.log2(max(z, 1))) - level)) + 1
        zero_until = np.ceil(-4 * (level + 1)) - 1  # rounds to zero for j <= this
    # 0 never clips
    clip_at = np.clip(np.nan_to_num(clip_at, posinf=CLIP_STEPS), 0, CLIP_STEPS).astype(np.int64)
    if z == 0:  # one bit: the short side has no level but 0
        clip_at[~long_side] = 0
    zero_until = np.clip(np.nan_to_num(zero_until, posinf=CLIP_STEPS), -1, CLIP_STEPS - 1).astype(np.int64)
    width = CLIP_STEPS + 1

    def hist(bins: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(seg * width + bins, weights=weights, minlength=groups * width).reshape(
            groups, width
        )

    def up_to(h: np.ndarray) -> np.ndarray:  # per candidate j: the entries with bin <= j
        return np.cumsum(h, axis=1)[:, :CLIP_STEPS]

    def above(h: np.ndarray) -> np.ndarray:  # per candidate j: the entries with bin > j
        return np.cumsum(h[:, ::-1], axis=1)[:, ::-1][:, 1:]

    # Clipped at j: entries with clip_at <= j; their error sum (|x| - e s_j)^2 = sum x^2 - 2 s_j sum e|x| + s_j^2 sum e^2.
    clipped_n = up_to(hist(clip_at, None))
    clipped_x2 = up_to(hist(clip_at, mag * mag))
    clipped_ex = up_to(hist(clip_at, ends * mag))
    clipped_e2 = up_to(hist(clip_at, ends * ends))
    # Rounded to zero at j: entries with zero_until >= j, i.e. zero_until + 1 > j.
    zero_n = above(hist(zero_until + 1, None))
    zero_x2 = above(hist(zero_until + 1, mag * mag))
    n = np.diff(bounds)[:, None]
    s = step0[:, None] * 2.0 ** (-j / 4)[None, :]
    rest = np.maximum(n - clipped_n - zero_n, 0)
    err = clipped_x2 - 2 * s * clipped_ex + s * s * clipped_e2 + zero_x2 + rest * s * s / 12
    return np.asarray(np.argmin(err, axis=1).astype(np.float64))


@register_codec
@dataclass
class Quantize(Codec):
    bits: int = 8
    granularity: str = "tensor"  # tensor | layer | channel
    rounding: str = "nearest"  # nearest | stochastic
    seed: int | None = None  # stochastic rounding: None = fresh randomness per message
    grid: str = "auto"  # auto | zero | minmax (seed 003)
    clip: str = "none"  # none | mse (grid zero)

    codec_id: ClassVar[str] = "quantize"
    positional: ClassVar[tuple[str, ...]] = ("bits",)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (1, 2, 4, 8):
            raise CodecError(f"quantize: bits must be 1, 2, 4 or 8, got {self.bits!r}")
        if self.granularity not in ("tensor", "layer", "channel"):
            raise CodecError(
                f"quantize: granularity must be tensor, layer or channel, got {self.granularity!r}"
            )
        if self.rounding not in ("nearest", "stochastic"):
            raise CodecError(f"quantize: rounding must be nearest or stochastic, got {self.rounding!r}")
        check_seed("quantize", self.seed)
        if self.grid not in GRIDS:
            raise CodecError(f"quantize: grid must be one of {list(GRIDS)}, got {self.grid!r}")
        if self.clip not in CLIPS:
            raise CodecError(f"quantize: clip must be one of {list(CLIPS)}, got {self.clip!r}")
        if self.clip != "none" and self.grid == "minmax":
            raise CodecError("quantize: clip=mse needs the grid that contains zero (grid=zero)")

    def get_config(self) -> dict[str, object]:
        """grid and clip only when set: a chain configured before they existed keeps its config and fingerprint."""
        config = super().get_config()
        for name, default in (("grid", "auto"), ("clip", "none")):
            if config[name] == default:
                del config[name]
        return config

    def grid_for(self, spec: ArraySpec) -> str:
        """The grid this message uses: "auto" is "zero" on the dense model, "minmax" after a sparsifier
        (or with clipping asked for, "zero")."""
        if self.grid != "auto":
            return self.grid
        return "zero" if spec.layout is not None or self.clip != "none" else "minmax"

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def _flags(self, spec: ArraySpec) -> int:
        return (STOCHASTIC if self.rounding == "stochastic" else 0) | (
            ZERO_GRID if self.grid_for(spec) == "zero" else 0
        )

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = require_array_spec(spec, "quantize")
        arr = s.check(x, "quantize input").astype(np.float32, copy=False)
        bounds = group_bounds(s, self.granularity, "quantize")
        starts = bounds[:-1]
        flags = self._flags(s)
        if flags & ZERO_GRID:
            z = (1 << (self.bits - 1)) - 1
            step32 = _round_up_f32(zero_grid_steps(arr, bounds, self.bits, self.clip))
            if not np.isfinite(step32).all() or (np.abs(step32.astype(np.float64)) * (z + 1) > F32_MAX).any():
                raise CodecError("quantize: a group's values reach beyond float32; scale the input down")
            params = step32
            # The grid both sides use is (q - z) * step32; round onto it in float64.
            offset, origin = np.zeros(len(starts)), float(z)
        else:
            if arr.size:
                lo = np.minimum.reduceat(arr, starts).astype(np.float64)
                hi = np.maximum.reduceat(arr, starts).astype(np.float64)
            else:
                lo = hi = np.zeros(len(starts))
            # Round the step up, never down, so the grid's top lo + levels * step reaches max.
            step32 = _round_up_f32((hi - lo) / self.levels)
            if not np.isfinite(step32).all() or (hi - lo > F32_MAX).any():
                raise CodecError(
                    "quantize: a group's value range (max - min) exceeds float32; scale the input down"
                )
            lo32 = lo.astype(np.float32)  # exact: lo is a float32 input value
            params = np.stack([lo32, step32], axis=1).reshape(-1)
            # The grid both sides use is lo32 + q * step32; round onto that grid, in float64.
            offset, origin = lo, 0.0
        step = step32.astype(np.float64)
        divisor = np.where(step != 0, step, 1.0)
        w = SideWriter().u8(flags)
        noise = None
        if self.rounding == "stochastic":
            seed = message_seed(self.seed, arr)
            w.u32(seed)
            noise = np.random.default_rng(seed)
        q = np.empty(arr.size, dtype=np.uint8)
        for start, stop, seg in chunk_segments(bounds):
            scaled = (arr[start:stop] - offset[seg]) / divisor[seg] + origin
            scaled = np.rint(scaled) if noise is None else np.floor(scaled + noise.random(stop - start))
            q[start:stop] = np.clip(scaled, 0, self.levels)
        w.array(params)
        return w.getvalue(), q

    def _read(self, spec: Spec, side: bytes) -> tuple[ArraySpec, np.ndarray, np.ndarray | None, np.ndarray]:
        """(spec, group bounds, lo per group or None for the zero grid, step per group)."""
        s = require_array_spec(spec, "quantize")
        bounds = group_bounds(s, self.granularity, "quantize")
        r = SideReader(side, "quantize")
        flags = r.u8()
        if flags != self._flags(s):
            raise CodecError("quantize: header flags do not match the configured rounding and grid")
        if flags & STOCHASTIC:
            r.u32()  # the sender's seed: informational
        groups = len(bounds) - 1
        if flags & ZERO_GRID:
            step = r.array(np.float32, groups)
            r.finish()
            z = (1 << (self.bits - 1)) - 1
            if not np.isfinite(step).all() or (np.abs(step.astype(np.float64)) * (z + 1) > F32_MAX).any():
                raise CodecError("quantize: group steps are not finite or reach beyond float32")
            return s, bounds, None, step
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
        symbols = np.asarray(y)
        out = np.empty(s.count, dtype=s.dtype)
        zero = np.float32((1 << (self.bits - 1)) - 1)
        for start, stop, seg in chunk_segments(bounds):
            q = symbols[start:stop].astype(np.float32)
            if lo is None:  # (q - z) is exact in float32: one rounding, of the product
                out[start:stop] = (q - zero) * step[seg]
            else:  # float32, as in every release: the ranges were checked above, so nothing overflows.
                out[start:stop] = lo[seg] + q * step[seg]
        return out
