"""`lattice`: fixed-step scalar quantization with a dead zone, DeepCABAC-style (seed 002).

Chain syntax: `lattice:0.0005` (step 0.0005), `lattice:step=0.001,levels=127`; in front of
`entropy`, usually behind `residual`: `residual | lattice:0.0005 | entropy`.

Every entry becomes an integer level q = round(x / step), clipped to [-levels, levels], and
decodes to q * step: DeepCABAC's uniform reconstruction quantizer with one fixed step for the
whole message. Entries with |x| < step / 2 get level 0 and are not sent at all: the header
carries the positions of the non-zero levels (Golomb-Rice, `positions.py`, near log2 C(n, k)
bits, the "significance map"), and only the non-zero levels go on, as symbols, to `entropy`.
Error bound: |x - x_hat| <= step / 2 for every |x| <= (levels + 1/2) * step.

Why a fixed step rather than `quantize`'s per-message range: the grid does not move between
messages, so behind `residual` (a residual against the copy the receiver already holds) nothing
accumulates: a coordinate is sent again only once the receiver's copy is off by step / 2 or more,
and never drifts further. That makes `residual | lattice | entropy` a catch-up coder for a
collaborator that missed rounds: it receives exactly the coordinates that changed since it last
synchronised, whatever the number of rounds in between (see `downlink.update_chain` in the
README: the aggregator then moves the global model sparsely, so that set stays small).

side: varint k | positions of the k non-zero levels
y:    k int16 levels in [-levels, levels] \\ {0}; decoding yields the dense float32 vector
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import ArraySpec, register_codec
from .errors import CodecError
from .sigmap import check_positions_mode
from .sparse import SparseCodec

MAX_LEVELS = 32767  # int16 symbols; `entropy` codes alphabets of up to 65,536


@register_codec
@dataclass
class Lattice(SparseCodec):
    step: float = 2.0**-12
    levels: int = MAX_LEVELS
    positions: str = "rice"  # how the non-zero positions are coded: "rice" (gaps) or "context" (sigmap.py)

    codec_id: ClassVar[str] = "lattice"
    positional: ClassVar[tuple[str, ...]] = ("step",)

    def __post_init__(self) -> None:
        s = self.step
        if (
            isinstance(s, bool)
            or not isinstance(s, int | float)
            or not math.isfinite(s)
            or not 1e-30 <= s <= 1e30
        ):
            raise CodecError(f"lattice: step must be a number in [1e-30, 1e30], got {s!r}")
        if (
            isinstance(self.levels, bool)
            or not isinstance(self.levels, int)
            or not 1 <= self.levels <= MAX_LEVELS
        ):
            raise CodecError(f"lattice: levels must be an integer in [1, {MAX_LEVELS}], got {self.levels!r}")
        check_positions_mode("lattice", self.positions)

    @property
    def _step32(self) -> np.float32:
        return np.float32(self.step)

    def _levels(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # |x| / step beyond float range: clipped below
            scaled = np.rint(x.astype(np.float64) / float(self._step32))
        return np.asarray(np.clip(np.nan_to_num(scaled, nan=0.0), -self.levels, self.levels).astype(np.int16))

    def select(self, x: np.ndarray, spec: ArraySpec) -> np.ndarray:
        return np.flatnonzero(self._levels(x)).astype(np.int64)

    def kept_values(self, x: np.ndarray, idx: np.ndarray) -> tuple[bytes, np.ndarray]:
        return b"", self._levels(x[idx])

    def kept_spec(self, k: int) -> ArraySpec:
        return ArraySpec(np.int16, k, symbols=(-self.levels, self.levels))

    def dense_values(self, y: np.ndarray, fields: Any) -> np.ndarray:
        return y.astype(np.float32) * self._step32
