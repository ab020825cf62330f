"""`ef`: error feedback (Seide et al. 2014; Karimireddy et al. 2019) in front of any lossy tail.

The sender adds its memory of everything not yet transmitted, y = x + memory, and after the
message keeps memory = y - y_hat, where y_hat is what the receiver reconstructs from the rest of
the chain. Sent plus remembered always equals the sum of the inputs, so nothing a sparsifier or
quantizer drops is lost: it is delayed. `ef | topk:0.01` is top-k with error feedback,
`ef | sign` is EF-signSGD, `ef | powersgd:2` is PowerSGD with error feedback.

State (sender only): `memory`, float32 of the input size. The receiver keeps nothing.
`with_memory` and `remember` are the two halves of the method, also used by stages that do error
feedback internally (`ae`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Codec, Data, Spec, StageState, StageUpdate, register_codec, require_array_spec
from .errors import CodecError

MEMORY = "memory"


def with_memory(x: np.ndarray, state: StageState) -> np.ndarray:
    """x plus what the sender has not transmitted yet (a new array; x itself when there is no memory)."""
    memory = state.get(MEMORY)
    if memory is None or memory.shape != x.shape:
        return x
    return (x + memory).astype(x.dtype, copy=False)


def remember(state: StageState, sent: np.ndarray, received: np.ndarray, decay: float = 1.0) -> None:
    """Keep what the receiver did not get of `sent` (it reconstructs `received`), faded by `decay`."""
    # a new array: scaled in place
    memory = (np.asarray(sent) - np.asarray(received)).astype(np.float32, copy=False)
    if decay != 1.0:
        memory *= np.float32(decay)
    state[MEMORY] = memory


@register_codec
@dataclass
class ErrorFeedback(Codec):
    decay: float = 1.0  # memory is multiplied by this each message (1: classic error feedback)

    codec_id: ClassVar[str] = "ef"
    positional: ClassVar[tuple[str, ...]] = ("decay",)
    stateful: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.decay, bool)
            or not isinstance(self.decay, int | float)
            or not 0.0 <= self.decay <= 1.0
        ):
            raise CodecError(f"ef: decay must be in [0, 1], got {self.decay!r}")

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        return b"", with_memory(require_array_spec(spec, "ef").check(x, "ef input"), state)

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        if side:
            raise CodecError("ef: unexpected header bytes")
        return require_array_spec(spec, "ef")

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        return y  # the receiver sees the corrected update as it is

    def update(self, state: StageState, event: StageUpdate) -> None:
        if event.y is None:  # receiver
            return
        assert isinstance(event.y, np.ndarray) and isinstance(event.y_hat, np.ndarray)
        remember(state, event.y, event.y_hat, self.decay)
