"""`residual`: ResFed predictive coding (seed 004): send x minus a prediction both sides share.

Chain syntax: `residual` (= `residual:last`) or `residual:linear`, in front of lossy stages:
`residual | topk:0.05 | quantize:8 | entropy`.

Sender and receiver each keep the same history of reconstructed messages (`StageUpdate.x_hat`,
identical on both sides) and predict the next one from it:
- `last`: the previous reconstruction (on the downlink: the model the collaborator already has);
- `linear`: 2 * x_{t-1} - x_{t-2}, a linear extrapolation, once two are known.
Before any history the prediction is zero, unless both sides primed the state with the same
reference (`prime_history`; plan `downlink.prior: "initial"` primes the downlink with the initial
model, which each side builds from the plan's seed). Only the residual goes on to the lossy stages, in
either direction. The state moves only on messages actually exchanged, so a collaborator that
skips rounds stays in sync; a CRC-32 of the prediction travels in the header, so a receiver whose
predictor differs refuses the message instead of silently corrupting the model.

side: u32 CRC-32 of the prediction;  y: x - prediction (float32, same layout)
State (both sides): `history` (up to 2 rows), `count`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import (
    Codec,
    Data,
    SideReader,
    SideWriter,
    Spec,
    StageState,
    StageUpdate,
    register_codec,
    require_array_spec,
)
from .errors import CodecError


@register_codec
@dataclass
class Residual(Codec):
    predictor: str = "last"  # last | linear

    codec_id: ClassVar[str] = "residual"
    positional: ClassVar[tuple[str, ...]] = ("predictor",)
    stateful: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.predictor not in ("last", "linear"):
            raise CodecError(f"residual: predictor must be 'last' or 'linear', got {self.predictor!r}")

    def prediction(self, state: StageState, count: int) -> np.ndarray:
        history = state.get("history")
        if history is None or history.shape[1] != count:
            return np.zeros(count, dtype=np.float32)
        if self.predictor == "linear" and history.shape[0] >= 2:
            with np.errstate(over="ignore", invalid="ignore"):
                pred = (2 * history[-1] - history[-2]).astype(np.float32)
            # Extrapolating a huge model can overflow; fall back to the last one (both sides alike).
            return np.asarray(pred if np.isfinite(pred).all() else history[-1])
        return np.asarray(history[-1])

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = require_array_spec(spec, "residual")
        arr = s.check(x, "residual input")
        pred = self.prediction(state, s.count)
        side = SideWriter().u32(checksum(pred)).getvalue()
        with np.errstate(over="ignore", invalid="ignore"):
            y = (arr - pred).astype(s.dtype, copy=False)
        if not np.isfinite(y).all():
            raise CodecError("residual: x - prediction overflows float32; scale the input down")
        return side, y

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        r = SideReader(side, "residual")
        r.u32()
        r.finish()
        return require_array_spec(spec, "residual")

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        s = require_array_spec(spec, "residual")
        pred = self.prediction(state, s.count)
        r = SideReader(side, "residual")
        expected = r.u32()
        r.finish()
        if checksum(pred) != expected:
            raise CodecError(
                f"residual: predictor out of sync (sender's reference checksum {expected:08x}, ours "
                f"{checksum(pred):08x}); the receiver's state does not match the sender's"
                + (
                    ""
                    if state.get("count") is None or int(state["count"][0]) != 1
                    else " (if downlink.prior is 'initial': the two sides built different initial models; they need "
                    "the same torch version)"
                )
            )
        with np.errstate(over="ignore", invalid="ignore"):  # overflow gives inf: refused by the chain
            return np.asarray((np.asarray(y, dtype=np.float32) + pred).astype(s.dtype, copy=False))

    def update(self, state: StageState, event: StageUpdate) -> None:
        x_hat = np.asarray(event.x_hat, dtype=np.float32)[None, :]
        history = state.get("history")
        keep = 2 if self.predictor == "linear" else 1
        if keep == 1 or history is None or history.shape[1] != x_hat.shape[1]:
            history = x_hat.copy()  # its own memory: one model, not a view into a larger array
        else:
            history = np.concatenate([history[-1:], x_hat])
        state["history"] = history
        state["count"] = np.array([int(state.get("count", np.zeros(1, np.int64))[0]) + 1], dtype=np.int64)


def checksum(prediction: np.ndarray) -> int:
    """CRC-32 of the prediction's bytes, read in place."""
    return zlib.crc32(np.ascontiguousarray(prediction).view(np.uint8).data)


def prime_history(state: StageState, reference: np.ndarray) -> None:
    """Make `reference` the first prediction (both sides must prime with the same bytes)."""
    state["history"] = np.ascontiguousarray(reference, dtype=np.float32).reshape(1, -1).copy()
    state["count"] = np.array([1], dtype=np.int64)
