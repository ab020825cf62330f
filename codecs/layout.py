"""Tensor layout: the names, shapes and dtypes of a model's tensors, in wire order.

A model travels as one flat float32 vector; the layout says how to cut it back into tensors, and in
which floating-point dtype each lives in the model (float32, float16, bfloat16, float64): the codecs
see float32 values, and `raw_bytes` is the model's own size in those dtypes.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CodecError

# The largest model we agree to describe: 2**31 elements (8 GiB of fp32).
MAX_ELEMENTS = 2**31
# The dtypes a tensor of a layout may have, and their sizes in bytes.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    tensors: tuple[TensorInfo, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise CodecError("layout has duplicate tensor names")
        for t in self.tensors:
            if t.dtype not in DTYPE_BYTES:
                raise CodecError(
                    f"layout tensor {t.name!r} has dtype {t.dtype}; supported: {', '.join(DTYPE_BYTES)}"
                )
            if any(d < 0 for d in t.shape):
                raise CodecError(f"layout tensor {t.name!r} has a negative dimension {t.shape}")
        if self.numel > MAX_ELEMENTS:
            raise CodecError(f"layout describes {self.numel} elements, above the limit of {MAX_ELEMENTS}")

    @classmethod
    def of(cls, tensors: Mapping[str, Any], *, dtypes: bool = False) -> Layout:
        """The layout of a name -> array (numpy or torch) mapping, in its iteration order: float32
        throughout, or (`dtypes`) each tensor's own floating-point dtype."""
        return cls(
            tuple(
                TensorInfo(name, tuple(int(d) for d in t.shape), dtype_name(t) if dtypes else "float32")
                for name, t in tensors.items()
            )
        )

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def raw_bytes(self) -> int:
        """Size of the model uncompressed, in its own dtypes (4 bytes an element for a float32 model)."""
        return sum(t.numel * DTYPE_BYTES[t.dtype] for t in self.tensors)

    def first_difference(self, other: Layout, *, ordered: bool = True) -> str | None:
        """The first tensor, in this layout's order, that `other` lacks or holds with another shape or dtype
        (or the first `other` has in excess), in words; None when they are the same (in any order, unless `ordered`)."""
        theirs = {t.name: t for t in other.tensors}
        for t in self.tensors:
            o = theirs.get(t.name)
            if o is None:
                return f"tensor {t.name!r} ({list(t.shape)} {t.dtype}) is missing"
            if o.shape != t.shape:
                return f"tensor {t.name!r} has shape {list(o.shape)}, expected {list(t.shape)}"
            if o.dtype != t.dtype:
                return f"tensor {t.name!r} has dtype {o.dtype}, expected {t.dtype}"
        names = {t.name for t in self.tensors}
        extra = [t.name for t in other.tensors if t.name not in names]
        if extra:
            return f"tensor {extra[0]!r} is not in the federation's model"
        if ordered and [t.name for t in other.tensors] != [t.name for t in self.tensors]:
            return "the same tensors in another order"
        return None

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def slices(self) -> Iterator[tuple[TensorInfo, slice]]:
        """Each tensor with its slice of the flat vector."""
        offset = 0
        for t in self.tensors:
            yield t, slice(offset, offset + t.numel)
            offset += t.numel

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate tensors (in layout order) into one float32 vector, checking names and shapes."""
        if set(tensors) != {t.name for t in self.tensors}:
            missing = {t.name for t in self.tensors} - set(tensors)
            extra = set(tensors) - {t.name for t in self.tensors}
            raise CodecError(
                f"tensors do not match the layout: missing {sorted(missing)}, extra {sorted(extra)}"
            )
        out = np.empty(self.numel, dtype=np.float32)
        for t, sl in self.slices():
            arr = np.asarray(tensors[t.name])
            if tuple(arr.shape) != t.shape:
                raise CodecError(f"tensor {t.name!r} has shape {tuple(arr.shape)}, layout says {t.shape}")
            out[sl] = arr.reshape(-1)
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of a flat vector as named tensors."""
        if flat.shape != (self.numel,):
            raise CodecError(f"flat vector has shape {flat.shape}, layout needs ({self.numel},)")
        return {t.name: flat[sl].reshape(t.shape) for t, sl in self.slices()}

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors]

    @classmethod
    def from_json(cls, data: Any) -> Layout:
        if not isinstance(data, list):
            raise CodecError("layout must be a list of {name, shape, dtype}")
        try:
            return cls(
                tuple(
                    TensorInfo(
                        str(d["name"]), tuple(int(s) for s in d["shape"]), str(d.get("dtype", "float32"))
                    )
                    for d in data
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed layout: {exc}") from exc

    def fingerprint(self, codec_config: Any = None) -> int:
        """CRC-32 of the canonical JSON of this layout (and a codec config, if given)."""
        blob = json.dumps([self.to_json(), codec_config], sort_keys=True, separators=(",", ":"))
        return zlib.crc32(blob.encode())


def dtype_name(tensor: Any) -> str:
    """The floating-point dtype of a numpy array or torch tensor, as a layout names it."""
    name = str(tensor.dtype).removeprefix("torch.")
    return {"float": "float32", "half": "float16", "double": "float64"}.get(name, name)
