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
import zlib

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .base import StageState
from .errors import CodecError


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

    def shares_arrays_with(self, other: CodecState) -> bool:
        """True when both hold the very same array objects (one is a fork of the other, or both of a
        third, and neither has moved since): then encoding into either gives the same bytes."""
        if self.messages != other.messages or self._stages.keys() != other._stages.keys():
            return False
        for index, mine in self._stages.items():
            theirs = other._stages[index]
            if mine.keys() != theirs.keys() or any(a is not theirs[k] for k, a in mine.items()):
                return False
        return True

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
