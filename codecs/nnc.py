"""`deepcabac`: DeepCABAC (seed 002) through Fraunhofer's NNCodec, an optional backend.

NNCodec pins numpy<2, so it cannot be installed beside fedsqueeze's default dependencies; it is the
extra `fedsqueeze[nnc]` for an environment that accepts numpy 1.x. Without it the codec is still
registered, so plans that name it fail with a clear message instead of "unknown codec". fedsqueeze's
own `entropy` stage after a quantizer is the always-available context-adaptive alternative.

The model travels as NNCodec's bitstream (the body); the layout gives the receiver the shapes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import BytesSpec, Codec, Data, Spec, StageState, register_codec, require_array_spec
from .errors import CodecError

MISSING = "deepcabac needs the optional NNCodec backend: pip install 'fedsqueeze[nnc]' (requires numpy<2)"


def _nnc() -> Any:
    try:
        import nnc  # type: ignore[import-not-found]
    except ImportError as exc:
        raise CodecError(MISSING) from exc
    return nnc


@register_codec
@dataclass
class DeepCABAC(Codec):
    qp: int = -32  # NNCodec's quantization parameter: lower is finer

    codec_id: ClassVar[str] = "deepcabac"
    positional: ClassVar[tuple[str, ...]] = ("qp",)
    output_kind: ClassVar[str] = "bytes"

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        nnc = _nnc()
        s = require_array_spec(spec, "deepcabac", dense_model=True)
        assert s.layout is not None
        tensors = {name: np.ascontiguousarray(t) for name, t in s.layout.unflatten(s.check(x, "deepcabac input")).items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.nnc"
            nnc.compress(tensors, bitstream_path=str(path), qp=self.qp)
            return b"", path.read_bytes()

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        s = require_array_spec(spec, "deepcabac", dense_model=True)
        return BytesSpec(2 * s.nbytes + 4096)

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState) -> Data:
        nnc = _nnc()
        s = require_array_spec(spec, "deepcabac", dense_model=True)
        assert s.layout is not None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.nnc"
            path.write_bytes(bytes(y))
            try:
                tensors = nnc.decompress(str(path))
            except Exception as exc:  # NNCodec raises its own types
                raise CodecError(f"deepcabac: corrupt bitstream: {exc}") from exc
        try:
            return s.layout.flatten({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})
        except CodecError as exc:
            raise CodecError(f"deepcabac: decoded tensors do not match the layout: {exc}") from exc
