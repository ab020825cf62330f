"""Sparsifiers: `topk`, `randk`, `prune` (magnitude pruning, seed 003) and `stc`.

Each keeps k of the n entries. The positions travel in the side header, Golomb-Rice coded near
log2 C(n, k) bits (`positions.py`), or with `positions=context` (topk, prune, stc) coded with row
and column contexts per tensor (`sigmap.py`), below that bound when the kept entries cluster;
`randk` sends only a seed instead. The kept values go on to
the next stage as a float32 array of length k (a quantizer or entropy coder may follow); `stc`
sends signs only, with one shared magnitude. Decoding yields the dense vector, zeros elsewhere.

`scope="layer"` selects per tensor (needs the dense model, so the stage must come before other
sparsifiers); `scope="global"` selects over the whole vector.

`SparseCodec` is the shared machinery of every codec whose message is "k positions and their
values" (here, and `lattice`); `top_indices`, `select_top` and `scatter` are the helpers other
codecs (`filterscale`, `ae`) use for the same jobs.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import (
    ArraySpec,
    Codec,
    Data,
    SideReader,
    SideWriter,
    Spec,
    StageState,
    register_codec,
    require_array_spec,
)
from .errors import CodecError
from .positions import decode_positions, encode_positions
from .sigmap import check_positions_mode, decode_mask, encode_mask


def kept_count(n: int, fraction: float, count: int | None = None) -> int:
    """k = ceil(fraction * n) (or `count`), clipped to [0, n]; any positive fraction keeps one.

    Float noise does not add an entry: 0.07 * 100 is 7.000000000000001 in binary floating
    point, and topk:0.07 keeps 7 of 100, not 8.
    """
    if count is not None:
        return max(0, min(n, int(count)))
    exact = fraction * n
    k = math.floor(exact)
    if exact - k > 1e-9 * exact:
        k += 1
    return max(0, min(n, int(k)))


# above this many entries, top-k partitions only the candidates above a sampled threshold
SAMPLED_TOP_K = 1 << 20


def top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k entries of largest magnitude."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= x.size:
        return np.arange(x.size, dtype=np.int64)
    a = np.abs(x)
    if x.size > SAMPLED_TOP_K and k <= x.size // 16:
        # A threshold below the k-th largest magnitude, from a strided sample; if at least k entries reach
        # it, the top k are among them (the same set as partitioning all of x, but for ties).
        sample = a[:: x.size // (1 << 16)]
        rank = sample.size - int(1.5 * k / x.size * sample.size) - 16
        cand = np.flatnonzero(a >= np.partition(sample, rank)[rank])
        if k <= cand.size <= x.size // 4:
            return np.sort(cand[np.argpartition(a[cand], cand.size - k)[cand.size - k :]]).astype(np.int64)
    idx = np.argpartition(a, x.size - k)[x.size - k :]
    return np.sort(idx).astype(np.int64)


def select_top(
    x: np.ndarray, spec: ArraySpec, keep: float, count: int | None, scope: str, who: str
) -> np.ndarray:
    """Sorted indices of the entries to keep by magnitude: over the whole vector, or `keep` of each layer."""
    if scope == "global":
        return top_indices(x, kept_count(x.size, keep, count))
    s = require_array_spec(spec, who, dense_model=True)
    assert s.layout is not None
    parts = [sl.start + top_indices(x[sl], kept_count(t.numel, keep, None)) for t, sl in s.layout.slices()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def scatter(idx: np.ndarray, values: np.ndarray, spec: ArraySpec) -> np.ndarray:
    """The dense vector of `spec` with `values` at `idx` and zeros elsewhere."""
    out = np.zeros(spec.count, dtype=spec.dtype)
    out[idx] = values
    return out


def _check_params(who: str, fraction: float, count: int | None, scope: str) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
        raise CodecError(f"{who}: fraction must be in [0, 1], got {fraction!r}")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise CodecError(f"{who}: count must be a non-negative integer, got {count!r}")
    if scope not in ("global", "layer"):
        raise CodecError(f"{who}: scope must be 'global' or 'layer', got {scope!r}")
    if count is not None and scope == "layer":
        raise CodecError(f"{who}: count applies to scope 'global' only")


def code_positions(idx: np.ndarray, spec: ArraySpec, mode: str) -> bytes:
    """k sorted positions among spec.count: Golomb-Rice gaps ("rice"); or with "context", a u8 choice
    and the shorter of the gaps and the context-coded map (sigmap.py), so never more than one byte worse."""
    rice = encode_positions(idx, spec.count)
    if mode != "context":
        return rice
    context = encode_mask(idx, spec)
    return b"\x01" + context if len(context) < len(rice) else b"\x00" + rice


def read_positions(data: bytes, spec: ArraySpec, k: int, mode: str, who: str) -> np.ndarray:
    """The k positions that `code_positions` coded in `data`."""
    if k > spec.count:
        raise CodecError(f"{who}: {k} kept entries out of {spec.count}")
    if mode != "context":
        return decode_positions(data, spec.count, k)
    if not data or data[0] > 1:
        raise CodecError(f"{who}: position coding byte missing or unknown")
    return decode_mask(data[1:], spec, k, who) if data[0] else decode_positions(data[1:], spec.count, k)


class SparseCodec(Codec):
    """A message of k kept positions and k values: side = varint k | fields | coded positions; y = the values.

    Subclasses choose the positions (`select`), what travels for them (`kept_values`, with any
    fixed-size header `fields`) and what they decode to (`dense_values`). Decoding yields the dense
    vector, zeros elsewhere. On the sender the chain hands the positions back as the decode hint,
    so a sender never decodes the positions it has just coded.
    """

    positions: str  # how the kept positions are coded: "rice" (gaps) or "context" (sigmap.py)

    @abstractmethod
    def select(self, x: np.ndarray, spec: ArraySpec) -> np.ndarray:
        """Sorted indices of the entries to keep."""

    @abstractmethod
    def kept_values(self, x: np.ndarray, idx: np.ndarray) -> tuple[bytes, np.ndarray]:
        """(fields, y): the header fields between k and the positions, and what travels for the kept entries."""

    def read_fields(self, reader: SideReader) -> Any:
        """Parse (and check) the header fields that `kept_values` wrote; default: none."""
        return None

    @abstractmethod
    def kept_spec(self, k: int) -> ArraySpec:
        """The spec of y for k kept entries."""

    @abstractmethod
    def dense_values(self, y: np.ndarray, fields: Any) -> np.ndarray:
        """The decoded value of each kept entry."""

    def encode_with_hint(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data, object]:
        s = require_array_spec(spec, self.codec_id)
        arr = s.check(x, f"{self.codec_id} input")
        idx = self.select(arr, s)
        fields, y = self.kept_values(arr, idx)
        side = (
            SideWriter().varint(idx.size).raw(fields).raw(code_positions(idx, s, self.positions)).getvalue()
        )
        return side, y, idx

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        side, y, _ = self.encode_with_hint(x, spec, state)
        return side, y

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        # The header's leading count is all the spec needs: the positions are decoded (and checked) once, by `decode`.
        s = require_array_spec(spec, self.codec_id)
        k = SideReader(side, self.codec_id).varint()
        if k > s.count:
            raise CodecError(f"{self.codec_id}: {k} kept entries out of {s.count}")
        return self.kept_spec(k)

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        s = require_array_spec(spec, self.codec_id)
        r = SideReader(side, self.codec_id)
        k = r.varint()
        fields = self.read_fields(r)
        if isinstance(hint, np.ndarray):
            idx = hint
        else:
            idx = read_positions(r.rest(), s, k, self.positions, self.codec_id)
        return scatter(idx, self.dense_values(np.asarray(y), fields), s)


class _MagnitudeSparsifier(SparseCodec):
    """Keeps the largest entries and sends their values as float32."""

    def _keep(self) -> tuple[float, int | None, str]:
        raise NotImplementedError

    def select(self, x: np.ndarray, spec: ArraySpec) -> np.ndarray:
        keep, count, scope = self._keep()
        return select_top(x, spec, keep, count, scope, self.codec_id)

    def kept_values(self, x: np.ndarray, idx: np.ndarray) -> tuple[bytes, np.ndarray]:
        return b"", x[idx].astype(np.float32)

    def kept_spec(self, k: int) -> ArraySpec:
        return ArraySpec(np.float32, k)

    def dense_values(self, y: np.ndarray, fields: Any) -> np.ndarray:
        return y.astype(np.float32, copy=False)


@register_codec
@dataclass
class TopK(_MagnitudeSparsifier):
    """Keep the k entries of largest magnitude (`fraction` of n, or `count`)."""

    fraction: float = 0.01
    count: int | None = None
    scope: str = "global"
    positions: str = "rice"

    codec_id: ClassVar[str] = "topk"
    positional: ClassVar[tuple[str, ...]] = ("fraction",)

    def __post_init__(self) -> None:
        _check_params("topk", self.fraction, self.count, self.scope)
        check_positions_mode("topk", self.positions)

    def _keep(self) -> tuple[float, int | None, str]:
        return self.fraction, self.count, self.scope


@register_codec
@dataclass
class Prune(_MagnitudeSparsifier):
    """Magnitude pruning (seed 003): zero the `rate` fraction of smallest-magnitude entries."""

    rate: float = 0.9
    scope: str = "layer"
    positions: str = "rice"

    codec_id: ClassVar[str] = "prune"
    positional: ClassVar[tuple[str, ...]] = ("rate",)

    def __post_init__(self) -> None:
        _check_params("prune", self.rate, None, self.scope)
        check_positions_mode("prune", self.positions)

    def _keep(self) -> tuple[float, int | None, str]:
        return 1.0 - self.rate, None, self.scope


@register_codec
@dataclass
class RandK(Codec):
    """Keep k random entries; only a 4-byte seed travels, not the positions.

    With `unbiased`, kept values are scaled by n/k so the decoded vector is an unbiased estimate.
    """

    fraction: float = 0.01
    count: int | None = None
    unbiased: bool = False
    seed: int = 0

    codec_id: ClassVar[str] = "randk"
    positional: ClassVar[tuple[str, ...]] = ("fraction",)
    stateful: ClassVar[bool] = True  # a per-message counter so every message draws new positions

    def __post_init__(self) -> None:
        _check_params("randk", self.fraction, self.count, "global")

    @staticmethod
    def _draw(n: int, k: int, message_seed: int) -> np.ndarray:
        rng = np.random.default_rng(message_seed)
        return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)

    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        s = require_array_spec(spec, "randk")
        arr = s.check(x, "randk input")
        counter = int(state.get("counter", np.zeros(1, np.int64))[0])
        message_seed = (self.seed * 1_000_003 + counter) & 0xFFFFFFFF
        k = kept_count(arr.size, self.fraction, self.count)
        idx = self._draw(arr.size, k, message_seed)
        values = arr[idx].astype(np.float32)
        if self.unbiased and k:
            values *= np.float32(arr.size / k)
        return SideWriter().u32(message_seed).varint(k).getvalue(), values

    def _read(self, spec: Spec, side: bytes) -> tuple[int, int]:
        s = require_array_spec(spec, "randk")
        r = SideReader(side, "randk")
        message_seed, k = r.u32(), r.varint()
        r.finish()
        if k > s.count:
            raise CodecError(f"randk: {k} kept entries out of {s.count}")
        return message_seed, k

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        return ArraySpec(np.float32, self._read(spec, side)[1])

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        s = require_array_spec(spec, "randk")
        message_seed, k = self._read(spec, side)
        out = np.zeros(s.count, dtype=s.dtype)
        out[self._draw(s.count, k, message_seed)] = np.asarray(y, dtype=np.float32)
        return out

    def update(self, state: StageState, event: object) -> None:
        counter = int(state.get("counter", np.zeros(1, np.int64))[0])
        state["counter"] = np.array([counter + 1], dtype=np.int64)


@register_codec
@dataclass
class STC(SparseCodec):
    """Sparse Ternary Compression (Sattler et al. 2019): top-k, then +-mu with mu the mean |kept|.

    side: varint k | f32 mu | coded positions; y: k sign symbols in {0: negative, 1: positive}.
    """

    fraction: float = 0.01
    count: int | None = None
    positions: str = "rice"  # "rice" (gaps) or "context" (sigmap.py)

    codec_id: ClassVar[str] = "stc"
    positional: ClassVar[tuple[str, ...]] = ("fraction",)

    def __post_init__(self) -> None:
        _check_params("stc", self.fraction, self.count, "global")
        check_positions_mode("stc", self.positions)

    def select(self, x: np.ndarray, spec: ArraySpec) -> np.ndarray:
        return top_indices(x, kept_count(x.size, self.fraction, self.count))

    def kept_values(self, x: np.ndarray, idx: np.ndarray) -> tuple[bytes, np.ndarray]:
        kept = x[idx]
        mu = float(np.mean(np.abs(kept))) if kept.size else 0.0
        return SideWriter().f32(mu).getvalue(), (kept > 0).astype(np.int8)

    def read_fields(self, reader: SideReader) -> float:
        mu = reader.f32()
        if not math.isfinite(mu) or mu < 0:
            raise CodecError("stc: magnitude is not a finite non-negative number")
        return mu

    def kept_spec(self, k: int) -> ArraySpec:
        return ArraySpec(np.int8, k, symbols=(0, 1))

    def dense_values(self, y: np.ndarray, fields: Any) -> np.ndarray:
        mu = np.float32(fields)
        return np.where(y > 0, mu, -mu)
