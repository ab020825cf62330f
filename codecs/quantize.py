"""`quantize`: uniform quantization to 1, 2, 4 or 8 bits (seed 003), per tensor, layer or channel.

Each group (the whole input, each layer, or each output channel = first dimension of a layer)
gets its own range [lo, lo + step * (2**bits - 1)]. Nearest rounding keeps |x - x_hat| <= step / 2;
stochastic rounding is unbiased, with its seed in the header so the receiver needs no state.

side: u8 flags | u32 seed (stochastic only) | per group: f32 lo, f32 step
y:    one symbol in [0, 2**bits - 1] per entry (bit-packed by `raw`, or coded by `entropy`)
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


def group_bounds(spec: ArraySpec, granularity: str, who: str) -> np.ndarray:
    """Start offsets of contiguous groups, plus the end: (tensor | layer | channel)."""
    if granularity == "tensor" or spec.layout is None and granularity == "layer":
        if granularity == "layer":
            raise CodecError(f"{who}: granularity 'layer' needs the dense model; place it before sparsifying stages")
        return np.array([0, spec.count], dtype=np.int64)
    s = require_array_spec(spec, who, dense_model=True)
    assert s.layout is not None
    starts: list[int] = []
    for t, sl in s.layout.slices():
        if t.numel == 0:
            continue
        if granularity == "channel" and len(t.shape) >= 2:
            per = t.numel // t.shape[0]
            starts.extend(range(sl.start, sl.stop, per))
        else:
            starts.append(sl.start)
    return np.array([*starts, spec.count], dtype=np.int64)


def segment_ids(bounds: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))


@register_codec
@dataclass
class Quantize(Codec):
    bits: int = 8
    granularity: str = "tensor"  # tensor | layer | channel
    rounding: str = "nearest"  # nearest | stochastic

    codec_id: ClassVar[str] = "quantize"
    positional: ClassVar[tuple[str, ...]] = ("bits",)

    def __post_init__(self) -> None:
        if self.bits not in (1, 2, 4, 8):
            raise CodecError(f"quantize: bits must be 1, 2, 4 or 8, got {self.bits!r}")
        if self.granularity not in ("tensor", "layer", "channel"):
            raise CodecError(f"quantize: granularity must be tensor, layer or channel, got {self.granularity!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise CodecError(f"quantize: rounding must be nearest or stochastic, got {self.rounding!r}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = require_array_spec(spec, "quantize")
        arr = s.check(x, "quantize input").astype(np.float32, copy=False)
        bounds = group_bounds(s, self.granularity, "quantize")
        starts = bounds[:-1]
        if arr.size:
            lo = np.minimum.reduceat(arr, starts).astype(np.float32)
            hi = np.maximum.reduceat(arr, starts).astype(np.float32)
        else:
            lo = hi = np.zeros(len(starts), np.float32)
        step = ((hi - lo) / np.float32(self.levels)).astype(np.float32)
        seg = segment_ids(bounds)
        safe = np.where(step > 0, step, np.float32(1))
        scaled = (arr - lo[seg]) / safe[seg]
        w = SideWriter().u8(1 if self.rounding == "stochastic" else 0)
        if self.rounding == "stochastic":
            seed = int.from_bytes(os.urandom(4), "little")
            w.u32(seed)
            scaled = np.floor(scaled + np.random.default_rng(seed).random(arr.size, dtype=np.float32))
        else:
            scaled = np.rint(scaled)
        q = np.clip(scaled, 0, self.levels).astype(np.uint8)
        w.array(np.stack([lo, step], axis=1).reshape(-1))
        return w.getvalue(), q

    def _read(self, spec: Spec, side: bytes) -> tuple[ArraySpec, np.ndarray, np.ndarray, np.ndarray]:
        s = require_array_spec(spec, "quantize")
        bounds = group_bounds(s, self.granularity, "quantize")
        r = SideReader(side, "quantize")
        flags = r.u8()
        if flags not in (0, 1) or flags != (self.rounding == "stochastic"):
            raise CodecError("quantize: header flags do not match the configured rounding")
        if flags:
            r.u32()
        groups = len(bounds) - 1
        params = r.array(np.float32, 2 * groups).reshape(groups, 2)
        r.finish()
        if not np.isfinite(params).all() or (params[:, 1] < 0).any():
            raise CodecError("quantize: group parameters are not finite and non-negative")
        return s, bounds, params[:, 0], params[:, 1]

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        s, *_ = self._read(spec, side)
        return ArraySpec(np.uint8, s.count, symbols=(0, self.levels))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState) -> Data:
        s, bounds, lo, step = self._read(spec, side)
        seg = segment_ids(bounds)
        with np.errstate(over="ignore", invalid="ignore"):  # corrupt ranges give inf: refused as non-finite
            out = lo[seg] + np.asarray(y).astype(np.float32) * step[seg]
        return out.astype(s.dtype)
