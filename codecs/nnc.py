"""`deepcabac`: DeepCABAC (seed 002) through Fraunhofer's NNCodec, an optional backend.

NNCodec is published on PyPI as `nncodec` (2.x, imported as `nncodec.nnc`); a 1.x install from
its source tree is imported as `nnc`. Both offer `compress(dict, ...)` / `decompress(bytearray)`.
(The PyPI project named `nnc` is an unrelated package.) NNCodec pins numpy<2, so it cannot be
installed beside fedsqueeze's default dependencies; it is the extra `fedsqueeze[nnc]` for an
environment that accepts numpy 1.x. Without it the codec is still registered, so plans that name
it fail with a clear message instead of "unknown codec". fedsqueeze's own `entropy` stage after a
quantizer is the always-available context-adaptive alternative.

The model travels as NNCodec's bitstream (the body); the layout gives the receiver the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import BytesSpec, Codec, Data, Spec, StageState, register_codec, require_array_spec
from .errors import CodecError

MISSING = (
    "deepcabac needs the optional NNCodec backend: pip install 'fedsqueeze[nnc]' (NNCodec requires numpy<2)"
)


def _nnc() -> Any:
    try:
        from nncodec import nnc  # NNCodec 2.x (PyPI: nncodec)
    except ImportError:
        try:
            import nnc  # NNCodec 1.x from source
        except ImportError as exc:
            raise CodecError(MISSING) from exc
    if not (callable(getattr(nnc, "compress", None)) and callable(getattr(nnc, "decompress", None))):
        raise CodecError(
            MISSING + f"; the installed module {getattr(nnc, '__name__', 'nnc')!r} is not NNCodec"
        )
    return nnc


@register_codec
@dataclass
class DeepCABAC(Codec):
    qp: int = -32  # NNCodec's quantization parameter: lower is finer

    codec_id: ClassVar[str] = "deepcabac"
    positional: ClassVar[tuple[str, ...]] = ("qp",)
    output_kind: ClassVar[str] = "bytes"

    def __post_init__(self) -> None:
        if isinstance(self.qp, bool) or not isinstance(self.qp, int) or not -256 <= self.qp <= 256:
            raise CodecError(f"deepcabac: qp must be an integer in [-256, 256], got {self.qp!r}")

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        nnc = _nnc()
        s = require_array_spec(spec, "deepcabac", dense_model=True)
        assert s.layout is not None
        flat = s.check(x, "deepcabac input").astype(np.float32, copy=False)
        tensors = {name: np.ascontiguousarray(t) for name, t in s.layout.unflatten(flat).items()}
        try:
            bitstream = nnc.compress(
                tensors, bitstream_path=None, qp=self.qp, verbose=False, return_bitstream=True
            )
        except (Exception, SystemExit) as exc:  # NNCodec reports bad input with SystemExit
            raise CodecError(f"deepcabac: NNCodec could not encode the model: {exc}") from exc
        return b"", bytes(bitstream)

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        if side:
            raise CodecError("deepcabac: unexpected header bytes")
        s = require_array_spec(spec, "deepcabac", dense_model=True)
        return BytesSpec(2 * s.nbytes + 4096)

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        nnc = _nnc()
        s = require_array_spec(spec, "deepcabac", dense_model=True)
        assert s.layout is not None
        try:
            tensors = nnc.decompress(bytearray(bytes(y)), verbose=False)
        except (Exception, SystemExit) as exc:  # NNCodec raises its own types, and SystemExit
            raise CodecError(f"deepcabac: corrupt bitstream: {exc}") from exc
        if not isinstance(tensors, dict):
            raise CodecError("deepcabac: NNCodec returned no tensors")
        try:
            return s.layout.flatten({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})
        except (CodecError, TypeError, ValueError) as exc:
            raise CodecError(f"deepcabac: decoded tensors do not match the layout: {exc}") from exc
