"""`sign`: one bit per entry with a scale, mean |x| per layer (or of the whole input).

Chain syntax: `sign`, `sign:per_layer=false`; `ef | sign` is EF-signSGD (Karimireddy et al.
2019): x_hat = (||x||_1 / d) * sign(x), with the error fed back by `ef`.

Per layer when the input is the dense model (and `per_layer`, the default); after a sparsifier
(no layout) one scale for the whole input. The scale mean |x| is the least-squares optimum for
a fixed sign vector, so ||x - x_hat||^2 = ||x||^2 - d * scale^2 per group. Zero maps to +scale.

side: f32 scale per group;  y: int8 symbols {0: negative, 1: non-negative}
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
from .quantize import group_bounds, segment_ids


@register_codec
@dataclass
class Sign(Codec):
    per_layer: bool = True  # per layer when the dense model is available

    codec_id: ClassVar[str] = "sign"

    def __post_init__(self) -> None:
        if not isinstance(self.per_layer, bool):
            raise CodecError(f"sign: per_layer must be true or false, got {self.per_layer!r}")

    def _bounds(self, spec: ArraySpec) -> np.ndarray:
        return group_bounds(spec, "layer" if self.per_layer and spec.layout is not None else "tensor", "sign")

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = require_array_spec(spec, "sign")
        arr = s.check(x, "sign input").astype(np.float32, copy=False)
        bounds = self._bounds(s)
        sizes = np.maximum(np.diff(bounds), 1)
        if arr.size:  # summed in float64: exact enough for huge layers, and no overflow
            scales = (np.add.reduceat(np.abs(arr).astype(np.float64), bounds[:-1]) / sizes).astype(np.float32)
        else:
            scales = np.zeros(len(bounds) - 1, np.float32)
        return SideWriter().array(scales).getvalue(), (arr >= 0).astype(np.int8)

    def _read(self, spec: Spec, side: bytes) -> tuple[ArraySpec, np.ndarray, np.ndarray]:
        s = require_array_spec(spec, "sign")
        bounds = self._bounds(s)
        r = SideReader(side, "sign")
        scales = r.array(np.float32, len(bounds) - 1)
        r.finish()
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise CodecError("sign: scales are not finite and non-negative")
        return s, bounds, scales

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        s, _, _ = self._read(spec, side)
        return ArraySpec(np.int8, s.count, symbols=(0, 1))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        s, bounds, scales = self._read(spec, side)
        signs = np.asarray(y).astype(np.float32) * 2 - 1
        return np.asarray((signs * scales[segment_ids(bounds)]).astype(s.dtype))
