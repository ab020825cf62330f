"""`ef`: error feedback (Seide et al. 2014; Karimireddy et al. 2019) in front of any lossy tail.

The sender adds its memory of everything not yet transmitted, y = x + memory, and after the
message keeps memory = y - y_hat, where y_hat is what the receiver reconstructs from the rest of
the chain. Sent plus remembered always equals the sum of the inputs, so nothing a sparsifier or
quantizer drops is lost: it is delayed. `ef | topk:0.01` is top-k with error feedback,
`ef | sign` is EF-signSGD, `ef | powersgd:2` is PowerSGD with error feedback.

State (sender only): `memory`, float32 of the input size. The receiver keeps nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Codec, Data, Spec, StageState, StageUpdate, register_codec, require_array_spec
from .errors import CodecError


@register_codec
@dataclass
class ErrorFeedback(Codec):
    decay: float = 1.0  # memory is multiplied by this each message (1: classic error feedback)

    codec_id: ClassVar[str] = "ef"
    positional: ClassVar[tuple[str, ...]] = ("decay",)
    stateful: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.decay, bool) or not isinstance(self.decay, int | float) or not 0.0 <= self.decay <= 1.0:
            raise CodecError(f"ef: decay must be in [0, 1], got {self.decay!r}")

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = require_array_spec(spec, "ef")
        arr = s.check(x, "ef input")
        memory = state.get("memory")
        if memory is None or memory.shape != arr.shape:
            return b"", arr
        return b"", (arr + memory).astype(s.dtype, copy=False)

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        if side:
            raise CodecError("ef: unexpected header bytes")
        return require_array_spec(spec, "ef")

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState) -> Data:
        return y  # the receiver sees the corrected update as it is

    def update(self, state: StageState, event: StageUpdate) -> None:
        if event.y is None:  # receiver
            return
        y, y_hat = np.asarray(event.y), np.asarray(event.y_hat)
        memory = (y - y_hat).astype(np.float32, copy=False)  # in place from here: one model-sized array, not three
        if self.decay != 1.0:
            memory *= np.float32(self.decay)
        state["memory"] = memory
