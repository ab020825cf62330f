"""Codec library shared by the aggregator and the collaborators.

Build a chain from a string or a JSON config and encode a flat float32 model vector:

    >>> from fedsqueeze.codecs import Pipeline, Layout, CodecState
    >>> chain = Pipeline.parse("fp16 | zstd:3")

Every codec is one module here, registered by its `codec_id` (see `registered_codecs()`).
"""

from importlib import import_module

from .base import (
    ArraySpec,
    BytesSpec,
    Codec,
    SideReader,
    SideWriter,
    StageState,
    StageUpdate,
    get_codec,
    register_codec,
    registered_codecs,
)
from .errors import CodecError
from .layout import Layout, TensorInfo
from .pipeline import Encoded, EncodeStats, Pipeline, parse_stage
from .state import CodecState

# One module per codec; importing a module registers its codecs.
CODEC_MODULES = ["raw", "cast", "zstd", "ef", "sparse", "quantize", "qsgd", "sign", "entropy", "residual", "lattice", "powersgd", "filterscale", "nnc", "autoencoder"]
for _name in CODEC_MODULES:
    import_module(f"{__name__}.{_name}")

__all__ = [
    "ArraySpec",
    "BytesSpec",
    "Codec",
    "CodecError",
    "CodecState",
    "Encoded",
    "EncodeStats",
    "Layout",
    "Pipeline",
    "SideReader",
    "SideWriter",
    "StageState",
    "StageUpdate",
    "TensorInfo",
    "get_codec",
    "parse_stage",
    "register_codec",
    "registered_codecs",
]
