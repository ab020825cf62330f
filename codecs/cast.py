"""`fp16` and `bf16`: cast the float32 model to 16 bits (2x), round to nearest even.

fp16 refuses values outside its range (|x| > 65504) rather than silently turning them into inf;
bf16 keeps float32's range with 8 bits of mantissa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import ArraySpec, Codec, Data, Spec, StageState, register_codec, require_array_spec
from .errors import CodecError

FP16_MAX = float(np.finfo(np.float16).max)


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (uint16): the top 16 bits, rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def from_bf16(patterns: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) back to float32 values."""
    return (np.asarray(patterns).astype(np.uint32) << np.uint32(16)).view(np.float32)


@register_codec
@dataclass
class Float16(Codec):
    codec_id: ClassVar[str] = "fp16"

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        arr = require_array_spec(spec, "fp16").check(x, "fp16 input")
        if arr.size and float(np.max(np.abs(arr))) > FP16_MAX:
            raise CodecError(f"fp16: values beyond +-{FP16_MAX:g} cannot be represented; use bf16")
        return b"", arr.astype(np.float16)

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        if side:
            raise CodecError("fp16: unexpected header bytes")
        return ArraySpec(np.float16, require_array_spec(spec, "fp16").count)

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        assert isinstance(y, np.ndarray)
        return y.astype(require_array_spec(spec, "fp16").dtype)


@register_codec
@dataclass
class BFloat16(Codec):
    codec_id: ClassVar[str] = "bf16"

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        return b"", to_bf16(require_array_spec(spec, "bf16").check(x, "bf16 input"))

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        if side:
            raise CodecError("bf16: unexpected header bytes")
        return ArraySpec(np.uint16, require_array_spec(spec, "bf16").count)

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        assert isinstance(y, np.ndarray)
        return from_bf16(y).astype(require_array_spec(spec, "bf16").dtype)
