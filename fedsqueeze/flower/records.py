"""What travels in Flower messages: the compressed ArrayRecord and the metadata beside it.

A compressed message's content holds, under the strategy's record key (FedAvg: "arrays"), an
ArrayRecord with one uint8 array named `fedsqueeze` (the codec chain's message, bytes for bytes) and
the record's other arrays unchanged (integers, e.g. BatchNorm's `num_batches_tracked`); and, under
the key `fedsqueeze`, a ConfigRecord with the link's counters and the fingerprint of (chain, layout).
Flower's transport, chunking and size meters (`message_size_mod`, the SuperLink's traffic
accounting) see the compressed size. Floating-point arrays of any precision are coded, and decoded,
as float32 (Flower's FedAdam returns float64 arrays). Nothing here unpickles: Flower's `Array.numpy()` loads with
`allow_pickle=False`, layouts are JSON and codec states safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedsqueeze.codecs import CodecError, Layout

PROTOCOL = 1
PAYLOAD = "fedsqueeze"  # the uint8 array inside the compressed ArrayRecord
META = "fedsqueeze"  # the ConfigRecord beside it in the message content

# Keys of the metadata ConfigRecord; every message carries the first three (uplink: the first two).
K_FINGERPRINT = "fingerprint"  # CRC-32 of (chain, layout) of this message
K_SEQ = "seq"  # downlink: messages the node decoded before this one; uplink: the node's uplink count
K_UP_SEQ = "up-seq"  # downlink only: uplink messages the server has decoded from the node
# Sent with the first message of a link (seq 0) only:
K_VERSION = "version"
K_RECORD = "record"  # content key of the compressed ArrayRecord
K_LAYOUT = "layout"
K_DOWNLINK = "downlink"
K_UPLINK = "uplink"
K_PRIOR = "prior"  # CRC-32 of the initial model the downlink is primed with, or -1


class FlowerCodecError(CodecError):
    """A compressed Flower message that cannot be decoded: out-of-sync link, foreign chain, bad bytes."""


@dataclass(frozen=True)
class RecordLayout:
    """The floating-point arrays of an ArrayRecord (what the chain codes, as float32) and the order of all its keys."""

    tensors: Layout
    keys: tuple[str, ...]

    @classmethod
    def of(cls, record: ArrayRecord) -> RecordLayout:
        if PAYLOAD in record:
            raise FlowerCodecError(
                f"the ArrayRecord already holds an array named {PAYLOAD!r}, the name fedsqueeze's payload travels under"
            )
        floats = {name: arr for name, arr in record.items() if _is_floating(arr)}
        return cls(Layout.of(floats), tuple(record.keys()))

    def to_json(self) -> str:
        return json.dumps({"tensors": self.tensors.to_json(), "keys": list(self.keys)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: Any) -> RecordLayout:
        try:
            data = json.loads(text)
            keys = tuple(str(k) for k in data["keys"])
            tensors = Layout.from_json(data["tensors"])
        except (TypeError, ValueError, KeyError) as exc:
            raise FlowerCodecError(f"malformed record layout in the fedsqueeze metadata: {exc}") from exc
        if not {t.name for t in tensors} <= set(keys):
            raise FlowerCodecError("malformed record layout: a tensor is missing from the key order")
        return cls(tensors, keys)

    @property
    def passthrough(self) -> tuple[str, ...]:
        names = {t.name for t in self.tensors}
        return tuple(k for k in self.keys if k not in names)

    def flatten(self, record: ArrayRecord) -> np.ndarray:
        """The record's floating-point arrays as one float32 vector in layout order (names and shapes checked)."""
        missing = [t.name for t in self.tensors if t.name not in record]
        if missing:
            raise FlowerCodecError(f"the ArrayRecord lacks the arrays {missing} of the link's layout")
        return self.tensors.flatten({t.name: _to_numpy(record[t.name], t.name) for t in self.tensors})

    def assemble(self, flat: np.ndarray, passthrough: dict[str, Array]) -> ArrayRecord:
        """An ArrayRecord in the original key order: float32 arrays cut from `flat`, the others as given."""
        tensors = self.tensors.unflatten(np.asarray(flat, dtype=np.float32))
        missing = [k for k in self.passthrough if k not in passthrough]
        if missing:
            raise FlowerCodecError(f"the compressed record lacks its uncompressed arrays {missing}")
        arrays = {
            k: Array(np.ascontiguousarray(tensors[k])) if k in tensors else passthrough[k] for k in self.keys
        }
        return ArrayRecord(array_dict=arrays)


def pack(data: bytes, record: ArrayRecord, layout: RecordLayout) -> ArrayRecord:
    """The compressed ArrayRecord: the chain's bytes as one uint8 array, then the passthrough arrays."""
    arrays = {PAYLOAD: Array(np.frombuffer(data, dtype=np.uint8))}
    for key in layout.passthrough:
        if key not in record:
            raise FlowerCodecError(f"the ArrayRecord lacks the array {key!r} of the link's layout")
        arrays[key] = record[key]
    return ArrayRecord(array_dict=arrays)


def unpack(record: Any) -> tuple[bytes, dict[str, Array]]:
    """The chain's bytes and the passthrough arrays of a compressed ArrayRecord."""
    if not isinstance(record, ArrayRecord) or PAYLOAD not in record:
        raise FlowerCodecError(
            f"the message's record is not a fedsqueeze payload (no uint8 array {PAYLOAD!r})"
        )
    payload = record[PAYLOAD]
    if payload.dtype != "uint8" or len(payload.shape) != 1:
        raise FlowerCodecError(
            f"the fedsqueeze payload must be a 1-D uint8 array, got {payload.dtype} {tuple(payload.shape)}"
        )
    data = _to_numpy(payload, PAYLOAD)
    return data.tobytes(), {k: v for k, v in record.items() if k != PAYLOAD}


def check_version(meta: Any) -> None:
    version = meta.get(K_VERSION)
    if version != PROTOCOL:
        raise FlowerCodecError(
            f"fedsqueeze metadata version {version!r}; this fedsqueeze.flower speaks version {PROTOCOL}"
        )


def meta_int(meta: Any, key: str) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlowerCodecError(f"fedsqueeze metadata field {key!r} must be an integer, got {value!r}")
    return value


def meta_str(meta: Any, key: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str):
        raise FlowerCodecError(f"fedsqueeze metadata field {key!r} must be a string, got {value!r}")
    return value


def _is_floating(arr: Array) -> bool:
    try:
        return np.dtype(str(arr.dtype)).kind == "f"
    except TypeError:
        return False


def _to_numpy(arr: Array, name: str) -> np.ndarray:
    try:
        return arr.numpy()  # np.load(..., allow_pickle=False)
    except (TypeError, ValueError, OSError) as exc:
        raise FlowerCodecError(f"array {name!r} is not a valid serialized array: {exc}") from exc
