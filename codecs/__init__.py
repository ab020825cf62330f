"""Codec library shared by the aggregator and the collaborators.

Build a chain from a string or a JSON config and encode a flat float32 model vector:

    >>> from fedsqueeze.codecs import Chain, Layout, CodecState
    >>> chain = Chain.parse("fp16 | zstd:3")

Every codec is one module here, registered by its `codec_id` (see `registered_codecs()`);
other packages add codecs through the `fedsqueeze.codecs` entry-point group (`base.py`).
"""

from importlib import import_module

from .base import (
    ENTRY_POINT_GROUP,
    ArraySpec,
    BytesSpec,
    Codec,
    Data,
    SideReader,
    SideWriter,
    Spec,
    StageState,
    StageUpdate,
    codec_class,
    get_codec,
    register_codec,
    registered_codecs,
    require_array_spec,
)
from .chain import Chain, Encoded, EncodeStats, parse_stage
from .errors import CodecError
from .layout import Layout, TensorInfo
from .state import CodecState, StateIdentity

# The built-in codecs, one module each; importing a module registers its codecs.
BUILTIN_MODULES = (
    "raw", "cast", "zstd", "ef", "sparse", "quantize", "qsgd", "sign", "entropy", "residual", "lattice",
    "powersgd", "filterscale", "nnc", "autoencoder",
)  # fmt: skip
for _name in BUILTIN_MODULES:
    import_module(f"{__name__}.{_name}")

__all__ = [
    "ENTRY_POINT_GROUP",
    "ArraySpec",
    "BytesSpec",
    "Chain",
    "Codec",
    "CodecError",
    "Data",
    "CodecState",
    "StateIdentity",
    "Encoded",
    "EncodeStats",
    "Layout",
    "SideReader",
    "SideWriter",
    "Spec",
    "StageState",
    "StageUpdate",
    "TensorInfo",
    "codec_class",
    "get_codec",
    "parse_stage",
    "register_codec",
    "registered_codecs",
    "require_array_spec",
]
