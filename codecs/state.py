"""CodecState: the memory of one codec chain for one (collaborator, direction) pair.

Each side of a link keeps its own CodecState for each direction. Stage `i` of the chain as
configured (`Chain.configured`: the stages as written, not counting the implicit `raw`
serializers) owns `state.stage(i)`, a dict of named numpy arrays, for example:

- error feedback (sender only): `memory`, the part of past inputs not yet transmitted;
- residual prediction (both sides): `history`, the last reconstructed models, and `count`;
- PowerSGD: the warm-start factor `q` for each layer.

Because both sides update their predictors from the same reconstructed values, sender and
receiver stay identical; `fingerprint` lets a peer check that. The whole object round-trips
through safetensors (`to_bytes` / `from_bytes`) for checkpoints: no pickle anywhere.
"""

from __future__ import annotations

import json
import struct
import weakref
import zlib
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .base import StageState
from .errors import CodecError


@dataclass(frozen=True)
class StateIdentity:
    """The arrays a CodecState holds, by identity: states that share every array (forks of one state
    that neither has moved since) have equal keys, and encoding into either gives the same bytes.

    `key` is hashable (array ids); `refs` are weak, so a state that is gone keeps nothing alive, and
    `same_arrays` checks that the arrays are still the same objects (an id may be reused once one is freed)."""

    key: tuple[object, ...]
    refs: tuple[weakref.ReferenceType[np.ndarray], ...]

    def same_arrays(self, other: StateIdentity) -> bool:
        """True when `other` (a live state's identity) names the very arrays this one was taken of."""
        return other.key == self.key and all(
            mine() is theirs() for mine, theirs in zip(self.refs, other.refs, strict=True)
        )


class CodecState:
    def __init__(self) -> None:
        self._stages: dict[int, StageState] = {}
        self.messages = 0  # messages this state has seen (encoded or decoded)

    def stage(self, index: int) -> StageState:
        return self._stages.setdefault(index, {})

    def fork(self) -> CodecState:
        """A copy to encode or decode into, committed by keeping it (or dropped). Cheap: new dicts over
        the same arrays, which is safe because stages assign new arrays and never write into them."""
        out = CodecState()
        out._stages = {i: dict(s) for i, s in self._stages.items()}
        out.messages = self.messages
        return out

    def identity(self) -> StateIdentity:
        """Which arrays this state holds, without keeping them alive (see `StateIdentity`)."""
        arrays = [(i, name, a) for i in sorted(self._stages) for name, a in sorted(self._stages[i].items())]
        key = (self.messages, *((i, name, id(a)) for i, name, a in arrays))
        return StateIdentity(key, tuple(weakref.ref(a) for _, _, a in arrays))

    def __bool__(self) -> bool:
        return any(self._stages.values())

    def nbytes(self) -> int:
        return sum(a.nbytes for s in self._stages.values() for a in s.values())

    def to_bytes(self) -> bytes:
        tensors = {
            f"{i}/{name}": np.ascontiguousarray(a) for i, s in self._stages.items() for name, a in s.items()
        }
        return st_save(tensors, metadata={"messages": str(self.messages)})

    @classmethod
    def from_bytes(cls, blob: bytes) -> CodecState:
        try:
            tensors = st_load(blob)
        except Exception as exc:  # safetensors raises its own error types
            raise CodecError(f"codec state is not valid safetensors: {exc}") from exc
        out = cls()
        for key, arr in tensors.items():
            index, _, name = key.partition("/")
            if not index.isdigit() or not name:
                raise CodecError(f"codec state has a malformed key {key!r}")
            out.stage(int(index))[name] = arr
        try:
            header_len = struct.unpack("<Q", blob[:8])[0]
            meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
            out.messages = int(meta.get("messages", 0))
        except (ValueError, struct.error):
            out.messages = 0
        return out

    def fingerprint(self, stages: list[int] | None = None) -> int:
        """CRC-32 over the named arrays of the given stages (all by default)."""
        crc = 0
        for i in sorted(self._stages if stages is None else stages):
            for name, arr in sorted(self._stages.get(i, {}).items()):
                crc = zlib.crc32(name.encode(), crc)
                crc = zlib.crc32(np.ascontiguousarray(arr).tobytes(), crc)
        return crc
