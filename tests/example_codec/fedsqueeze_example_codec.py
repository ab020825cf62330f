"""`absmax8`: symmetric 8-bit quantization with one scale, a fedsqueeze codec from outside fedsqueeze.

Each value becomes round(127 * x / max|x|), an integer in [-127, 127] (zero stays exactly zero), so
an `entropy` stage may follow; the scale travels in the side header as float32. Error bound:
|x - x_hat| <= max|x| / 254 (half a step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedsqueeze.codecs import (
    ArraySpec,
    Codec,
    CodecError,
    Data,
    SideReader,
    SideWriter,
    Spec,
    StageState,
    require_array_spec,
)

LEVELS = 127


@dataclass
class AbsMax8(Codec):
    codec_id: ClassVar[str] = "absmax8"

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        arr = require_array_spec(spec, "absmax8").check(x, "absmax8 input")
        scale = float(np.max(np.abs(arr))) if arr.size else 0.0
        q = (
            np.zeros(arr.shape, np.int8)
            if scale == 0
            else np.rint(arr / np.float32(scale) * LEVELS).astype(np.int8)
        )
        return SideWriter().f32(scale).getvalue(), q

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        r = SideReader(side, "absmax8")
        scale = r.f32()
        r.finish()
        if not math.isfinite(scale) or scale < 0:
            raise CodecError("absmax8: the scale is not a finite non-negative number")
        return ArraySpec(np.int8, require_array_spec(spec, "absmax8").count, symbols=(-LEVELS, LEVELS))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        scale = SideReader(side, "absmax8").f32()
        return (np.asarray(y).astype(np.float32) * np.float32(scale / LEVELS)).astype(np.float32)
