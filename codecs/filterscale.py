"""`filterscale`: filter-wise scaled sparse ternary updates (seed 002, first abstract).

Chain syntax: `filterscale:0.01` (keep 1 % per layer), usually `ef | filterscale:0.01 | entropy`.

Per layer, the top `fraction` of entries by magnitude is kept (k = ceil(fraction * numel), the
same rule as `topk`) and sent as a sign; every output filter (first dimension of a weight
tensor; a bias or other 1-D tensor counts as one filter) gets its own scale, the least-squares
optimum for ternary values: the mean |kept| within that filter. Compared with STC's single
global magnitude, filters whose updates are large keep their size and small ones are not
inflated, which compensates highly sparse updates at the cost of one fp16 per filter.

Scales are float16 (clipped to 65504; a filter whose mean |kept| is below ~6e-8 decodes as
zero). Needs the dense model: place it first, or after `ef` / `residual`.

side: varint k | varint len | positions (Golomb-Rice, `positions.py`) | fp16 scale per filter
y:    k int8 sign symbols {0: -, 1: +}; decoding yields the dense float32 vector
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
from .positions import decode_positions, encode_positions
from .quantize import group_bounds
from .sparse import scatter, select_top

FP16_MAX = float(np.finfo(np.float16).max)


@register_codec
@dataclass
class FilterScale(Codec):
    fraction: float = 0.01

    codec_id: ClassVar[str] = "filterscale"
    positional: ClassVar[tuple[str, ...]] = ("fraction",)

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= f <= 1.0:
            raise CodecError(f"filterscale: fraction must be in [0, 1], got {f!r}")

    def encode_with_hint(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data, object]:
        s = require_array_spec(spec, "filterscale", dense_model=True)
        arr = s.check(x, "filterscale input")
        idx = select_top(arr, s, self.fraction, None, "layer", "filterscale")
        bounds = group_bounds(s, "channel", "filterscale")
        filters = len(bounds) - 1
        owner = np.searchsorted(bounds, idx, side="right") - 1
        kept = np.abs(arr[idx]).astype(np.float64)
        counts = np.bincount(owner, minlength=filters)
        sums = np.bincount(owner, weights=kept, minlength=filters)
        scales = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        scales = np.minimum(scales, FP16_MAX).astype(np.float16)
        side = (
            SideWriter()
            .varint(idx.size)
            .varint(len(pos := encode_positions(idx, arr.size)))
            .raw(pos)
            .array(scales)
            .getvalue()
        )
        return side, (arr[idx] > 0).astype(np.int8), idx

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        side, y, _ = self.encode_with_hint(x, spec, state)
        return side, y

    def _read(
        self, spec: Spec, side: bytes, hint: object = None
    ) -> tuple[ArraySpec, np.ndarray, np.ndarray, np.ndarray]:
        s = require_array_spec(spec, "filterscale", dense_model=True)
        bounds = group_bounds(s, "channel", "filterscale")
        r = SideReader(side, "filterscale")
        k = r.varint()
        if k > s.count:
            raise CodecError(f"filterscale: {k} kept entries out of {s.count}")
        coded = r.raw(r.varint())
        idx = hint if isinstance(hint, np.ndarray) else decode_positions(coded, s.count, k)
        scales = r.array(np.float16, len(bounds) - 1).astype(np.float32)
        r.finish()
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise CodecError("filterscale: scales are not finite and non-negative")
        return s, bounds, idx, scales

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        # The count is all the spec needs; `decode` reads (and checks) the positions and scales once.
        s = require_array_spec(spec, "filterscale", dense_model=True)
        k = SideReader(side, "filterscale").varint()
        if k > s.count:
            raise CodecError(f"filterscale: {k} kept entries out of {s.count}")
        return ArraySpec(np.int8, k, symbols=(0, 1))

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        s, bounds, idx, scales = self._read(spec, side, hint)
        owner = np.searchsorted(bounds, idx, side="right") - 1
        return scatter(idx, np.where(np.asarray(y) > 0, 1.0, -1.0).astype(np.float32) * scales[owner], s)
