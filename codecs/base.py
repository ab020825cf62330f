"""The codec interface, the specs that flow between chain stages, and the registry.

A chain (see `chain.py`) runs stages in order. Each stage takes its input `x`, described by a
`Spec`, and returns `(side, y)`: `side` is the small header only this stage reads back
(positions, scales, norms), `y` is what the next stage receives. Decoding runs the chain in
reverse. Before any stage decodes, the receiver walks the side headers forward with
`output_spec`, so every stage knows exactly what size and type to expect, and bad input is
refused before anything is allocated.

Specs:
- `ArraySpec(dtype, count, layout=None, symbols=None)`: a flat array. `layout` is set while the
  array is the dense model (so per-layer codecs can see shapes); `symbols=(lo, hi)` marks an
  integer array whose values lie in [lo, hi], which the final serializer bit-packs.
- `BytesSpec(max_size)`: opaque bytes of at most `max_size`.

Codec memory across rounds (error feedback, predictors) lives in a `StageState`, never on the
codec object, so one codec object serves every collaborator. `update` assigns new arrays to its
StageState and never writes into the arrays it holds, so a state can be forked cheaply (a new
dict, the same arrays) and a message decoded into the fork, committed only if it is accepted.

Registry: the built-in codecs register themselves when `fedsqueeze.codecs` is imported; other
packages add codecs through the entry-point group `fedsqueeze.codecs` (name: the codec id, value:
`module:Class`), loaded when a chain first names that id. Only installed packages can be loaded:
a chain config (which may come over the network, in a plan) names a codec id, never a module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, TypeVar

import numpy as np

from .errors import CodecError
from .layout import Layout

Data = np.ndarray | bytes
StageState = dict[str, np.ndarray]
#: Entry-point group through which other packages register codecs (name = codec id).
ENTRY_POINT_GROUP = "fedsqueeze.codecs"

log = logging.getLogger("fedsqueeze.codecs")


@dataclass(frozen=True)
class ArraySpec:
    dtype: Any  # anything np.dtype() accepts; stored as np.dtype
    count: int
    layout: Layout | None = None
    symbols: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.count < 0:
            raise CodecError(f"negative element count {self.count}")

    @property
    def nbytes(self) -> int:
        return int(self.count * self.dtype.itemsize)

    def check(self, y: Data, who: str) -> np.ndarray:
        """`y` as an array that matches this spec, or CodecError."""
        if not isinstance(y, np.ndarray):
            raise CodecError(f"{who}: expected an array, got {type(y).__name__}")
        if y.dtype != self.dtype or y.shape != (self.count,):
            raise CodecError(f"{who}: expected {self.count} x {self.dtype}, got {y.shape} x {y.dtype}")
        if self.symbols is not None and y.size:
            lo, hi = self.symbols
            if int(y.min()) < lo or int(y.max()) > hi:
                raise CodecError(f"{who}: symbols outside [{lo}, {hi}]")
        return y


@dataclass(frozen=True)
class BytesSpec:
    max_size: int

    def check(self, y: Data, who: str) -> bytes:
        if not isinstance(y, bytes | bytearray | memoryview):
            raise CodecError(f"{who}: expected bytes, got {type(y).__name__}")
        if len(y) > self.max_size:
            raise CodecError(f"{who}: {len(y)} bytes exceeds the limit of {self.max_size}")
        return bytes(y)


Spec = ArraySpec | BytesSpec


@dataclass(frozen=True)
class StageUpdate:
    """What a stage sees after each message, identically on both sides except for x and y.

    x, y: this stage's input and output on the sender; None on the receiver.
    x_hat, y_hat: the receiver's reconstruction of them (the sender computes the same).
    """

    spec: Spec
    x_hat: Data
    y_hat: Data
    x: Data | None = None
    y: Data | None = None


C = TypeVar("C", bound="Codec")


class Codec(ABC):
    """One stage of a chain. Subclasses are dataclasses whose fields are the JSON config."""

    codec_id: ClassVar[str]
    #: Names of the parameters that the chain-string form takes positionally: `topk:0.01`.
    positional: ClassVar[tuple[str, ...]] = ()
    #: True if decode(encode(x)) == x exactly.
    lossless: ClassVar[bool] = False
    #: True if the stage keeps memory across messages in its StageState.
    stateful: ClassVar[bool] = False
    #: "array" or "bytes": what the stage consumes and produces. A chain inserts the `raw`
    #: serializer where an array meets a bytes stage, and after a last stage that yields an array.
    input_kind: ClassVar[str] = "array"
    output_kind: ClassVar[str] = "array"

    @abstractmethod
    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        """Return (side, y): this stage's header and the payload for the next stage."""

    def encode_with_hint(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data, object]:
        """`encode`, plus a hint the chain hands back to this stage's `decode` on the sender.

        The sender rebuilds the receiver's view by decoding; a hint lets it skip re-deriving
        what `encode` already knew (a sparsifier's kept positions). Default: no hint.
        """
        side, y = self.encode(x, spec, state)
        return side, y, None

    @abstractmethod
    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        """The spec of y, from the input spec and the header. Validates the header."""

    @abstractmethod
    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        """Reconstruct x (exactly or approximately). Must not modify `state`.

        `hint` is what `encode_with_hint` returned for this very message, on the sender only;
        a receiver always decodes from the bytes alone (hint None)."""

    def update(self, state: StageState, event: StageUpdate) -> None:  # noqa: B027 - optional hook
        """Advance the stage's memory after a message; runs on both sides. Default: stateless.

        Assign new arrays to `state`; never write into the ones it holds (see the module docstring)."""

    # -- configuration -------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"id": self.codec_id, **params}

    @classmethod
    def from_config(cls: type[C], config: dict[str, Any]) -> C:
        params = {k: v for k, v in config.items() if k != "id"}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(params) - names
        if unknown:
            raise CodecError(
                f"codec {cls.codec_id!r}: unknown parameter(s) {sorted(unknown)}; known: {sorted(names)}"
            )
        try:
            return cls(**params)
        except TypeError as exc:
            raise CodecError(f"codec {cls.codec_id!r}: {exc}") from exc

    def __str__(self) -> str:
        params = {k: v for k, v in self.get_config().items() if k != "id"}
        if not params:
            return self.codec_id
        return self.codec_id + ":" + ",".join(f"{k}={json.dumps(v)}" for k, v in params.items())


_REGISTRY: dict[str, type[Codec]] = {}
_TRIED_ENTRY_POINTS: set[str] = set()


def register_codec(cls: type[C]) -> type[C]:
    """Class decorator: make a codec constructible by its `codec_id`."""
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise TypeError(f"{cls!r} is not a Codec subclass")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass")
    if not isinstance(getattr(cls, "codec_id", None), str) or not cls.codec_id:
        raise TypeError(f"{cls.__name__} needs a non-empty string codec_id")
    existing = _REGISTRY.get(cls.codec_id)
    if existing is not None and existing is not cls:
        raise TypeError(f"codec id {cls.codec_id!r} is already registered by {existing.__name__}")
    _REGISTRY[cls.codec_id] = cls
    return cls


def _load_entry_points(name: str | None = None) -> None:
    """Register the codecs other packages declare in the `fedsqueeze.codecs` entry-point group.

    `name`: only that codec id (a chain names it); None: all of them (listing). A broken plugin is
    logged and skipped, so one bad package cannot take the built-in codecs down with it."""
    found = (
        entry_points(group=ENTRY_POINT_GROUP)
        if name is None
        else entry_points(group=ENTRY_POINT_GROUP, name=name)
    )
    for ep in found:
        if ep.name in _TRIED_ENTRY_POINTS:
            continue
        _TRIED_ENTRY_POINTS.add(ep.name)
        try:
            cls = ep.load()
            if getattr(cls, "codec_id", None) != ep.name:
                raise TypeError(
                    f"its codec_id is {getattr(cls, 'codec_id', None)!r}, not the entry point's name"
                )
            if _REGISTRY.get(ep.name) is not cls:
                register_codec(cls)
        except Exception as exc:  # noqa: BLE001 - a third-party package may raise anything on import
            log.warning("codec entry point %s = %s could not be loaded: %s", ep.name, ep.value, exc)


def registered_codecs() -> dict[str, type[Codec]]:
    """Every codec: the built-in ones and those of installed packages (entry points)."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def codec_class(codec_id: str) -> type[Codec] | None:
    """The class registered under `codec_id`, looking in the entry points once if it is not built in."""
    if codec_id not in _REGISTRY:
        _load_entry_points(codec_id)
    return _REGISTRY.get(codec_id)


def get_codec(config: dict[str, Any] | str) -> Codec:
    """A codec from its config dict (`{"id": ..., **params}`) or bare id."""
    if isinstance(config, str):
        config = {"id": config}
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise CodecError(f"a codec config is a JSON object with a string 'id', got {config!r}")
    cls = codec_class(config["id"])
    if cls is None:
        raise CodecError(f"unknown codec {config['id']!r}; known codecs: {', '.join(registered_codecs())}")
    return cls.from_config(config)


# -- helpers for writing and reading side headers ------------------------------------------------
class SideWriter:
    """Little-endian header builder."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> SideWriter:
        self._parts.append(struct.pack("<B", v))
        return self

    def u32(self, v: int) -> SideWriter:
        self._parts.append(struct.pack("<I", v))
        return self

    def f32(self, v: float) -> SideWriter:
        self._parts.append(struct.pack("<f", v))
        return self

    def varint(self, v: int) -> SideWriter:
        self._parts.append(encode_varint(v))
        return self

    def raw(self, b: bytes) -> SideWriter:
        self._parts.append(bytes(b))
        return self

    def array(self, a: np.ndarray) -> SideWriter:
        self._parts.append(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class SideReader:
    """Bounds-checked header reader: every read past the end raises CodecError."""

    def __init__(self, data: bytes, who: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._who = who

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._data):
            raise CodecError(f"{self._who}: header truncated (needs {n} more bytes at offset {self._pos})")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self._take(4))[0])

    def f32(self) -> float:
        return float(struct.unpack("<f", self._take(4))[0])

    def varint(self) -> int:
        value, self._pos = decode_varint(self._data, self._pos, self._who)
        return value

    def raw(self, n: int) -> bytes:
        return bytes(self._take(n))

    def array(self, dtype: Any, count: int) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self._take(count * dt.itemsize), dtype=dt).astype(np.dtype(dtype), copy=True)

    def rest(self) -> bytes:
        return bytes(self._take(len(self._data) - self._pos))

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise CodecError(f"{self._who}: {len(self._data) - self._pos} unexpected trailing header bytes")


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | memoryview, pos: int, who: str) -> tuple[int, int]:
    value = 0
    for shift in range(0, 64, 7):
        if pos >= len(data):
            raise CodecError(f"{who}: truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise CodecError(f"{who}: varint longer than 64 bits")


def require_array_spec(
    spec: Spec, who: str, *, dense_model: bool = False, floating: bool = True
) -> ArraySpec:
    """The spec as an ArraySpec, or a CodecError saying where the stage may be placed in a chain."""
    if not isinstance(spec, ArraySpec):
        raise CodecError(f"{who} needs an array input; place it before byte-level stages such as zstd")
    if floating and spec.dtype.kind != "f":
        raise CodecError(f"{who} needs floating-point input, got {spec.dtype}")
    if dense_model and spec.layout is None:
        raise CodecError(
            f"{who} needs the dense model (per-layer shapes); place it before sparsifying stages"
        )
    return spec
