"""`zstd`: lossless byte compression with decompression bounded by the expected size.

python-zstandard allocates whatever a frame header claims, so the claimed content size is
checked against the receiver's expected size before anything is decompressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import zstandard

from .base import BytesSpec, Codec, Data, Spec, StageState, register_codec
from .errors import CodecError


def _bytes_spec(spec: Spec) -> BytesSpec:
    if not isinstance(spec, BytesSpec):
        raise CodecError("zstd needs byte input")
    return spec


@register_codec
@dataclass
class Zstd(Codec):
    level: int = 3

    codec_id: ClassVar[str] = "zstd"
    positional: ClassVar[tuple[str, ...]] = ("level",)
    lossless: ClassVar[bool] = True
    input_kind: ClassVar[str] = "bytes"
    output_kind: ClassVar[str] = "bytes"

    def __post_init__(self) -> None:
        if not isinstance(self.level, int) or not -7 <= self.level <= 22:
            raise CodecError(f"zstd: level must be an integer in [-7, 22], got {self.level!r}")

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        data = _bytes_spec(spec).check(x, "zstd input")
        return b"", zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(data)

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        if side:
            raise CodecError("zstd: unexpected header bytes")
        n = _bytes_spec(spec).max_size
        return BytesSpec(n + (n >> 7) + 256)  # above ZSTD_COMPRESSBOUND

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        limit = _bytes_spec(spec).max_size
        frame = bytes(y)
        try:
            params = zstandard.get_frame_parameters(frame)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: not a zstd frame: {exc}") from exc
        if params.content_size == zstandard.CONTENTSIZE_UNKNOWN or params.content_size < 0:
            raise CodecError("zstd: frame does not declare its content size")
        if params.content_size > limit:
            raise CodecError(f"zstd: frame claims {params.content_size} bytes, above the expected {limit}")
        try:
            # The claimed size is bounded above; libzstd enforces that the content matches it.
            stream = zstandard.ZstdDecompressor().decompressobj()
            out = stream.decompress(frame)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd: corrupt frame: {exc}") from exc
        if not stream.eof or stream.unused_data:
            raise CodecError("zstd: truncated frame or trailing bytes after it")
        if len(out) != params.content_size:
            raise CodecError("zstd: frame content does not match its declared size")
        return out
