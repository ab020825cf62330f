"""Codec chains: `residual | topk:0.01 | qsgd:4 | entropy`, one `Chain` object built from config.

Wire format of an encoded message (all of it counts as wire bytes):

    version (1 byte) | for each stage: varint len, side header | body

The body is the last stage's output. When that output is an array, an implicit `raw` stage
serializes it (bit-packed when the array holds small integer symbols); an array that reaches a
bytes-only stage (zstd) is serialized the same way first.

After each message both sides call every stage's `update` with the same reconstructed values,
so stateful stages (error feedback, predictors) evolve identically on sender and receiver. Stage
`i` of the configured chain (as written, without the implicit `raw` stages) keeps its memory in
`state.stage(i)`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import (
    ArraySpec,
    Codec,
    Data,
    Spec,
    StageState,
    StageUpdate,
    codec_class,
    decode_varint,
    encode_varint,
    get_codec,
)
from .errors import CodecError
from .layout import Layout
from .raw import Raw
from .state import CodecState

WIRE_VERSION = 1


@dataclass
class EncodeStats:
    """What a codec chain reports about one message."""

    raw_bytes: int  # the model as fp32
    wire_bytes: int  # len() of the encoded message
    seconds: float
    nmse: float  # ||x - x_hat||^2 / ||x||^2 (0 for an all-zero x)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(self.wire_bytes, 1)


@dataclass
class Encoded:
    data: bytes
    reconstruction: np.ndarray  # what the receiver will decode, bit for bit
    stats: EncodeStats


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_stage(text: str) -> dict[str, Any]:
    """`topk:0.01` or `quantize:bits=4,per=channel` -> a codec config dict."""
    name, _, args = text.strip().partition(":")
    name = name.strip()
    if not name:
        raise CodecError(f"empty codec name in {text!r}")
    config: dict[str, Any] = {"id": name}
    if not args.strip():
        return config
    cls = codec_class(name)
    if cls is None:
        from .base import registered_codecs

        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(registered_codecs())}")
    positional = list(cls.positional)
    for i, item in enumerate(a.strip() for a in args.split(",")):
        if "=" in item:
            key, _, value = item.partition("=")
            config[key.strip()] = _parse_value(value.strip())
        elif i < len(positional):
            config[positional[i]] = _parse_value(item)
        else:
            raise CodecError(
                f"codec {name!r} takes {len(positional)} positional argument(s) ({positional}); got {args!r}"
            )
    return config


def squared_norms(x: np.ndarray, x_hat: np.ndarray, chunk: int = 1 << 20) -> tuple[float, float]:
    """(|x|^2, |x - x_hat|^2), a chunk at a time: no model-sized error vector."""
    denom = error = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # |x| near float32's limit: the sums overflow to inf
        for start in range(0, x.size, chunk):
            part = x[start : start + chunk]
            err = part - x_hat[start : start + chunk]
            denom += float(np.dot(part, part))
            error += float(np.dot(err, err))
    return denom, error


class Chain:
    """A chain of codecs, encoding a flat float32 model vector to bytes and back."""

    def __init__(self, stages: list[Codec]) -> None:
        if not stages:
            raise CodecError("empty codec chain")
        self.configured = list(stages)
        # The stages as run: `raw` wherever an array meets a bytes stage, and at the end.
        self.stages: list[Codec] = []
        # For each run stage, its index in `configured` (whose CodecState slot it uses); None: implicit raw.
        self._slots: list[int | None] = []
        kind = "array"
        for index, stage in enumerate(self.configured):
            if kind == "array" and stage.input_kind == "bytes" and not isinstance(stage, Raw):
                self.stages.append(Raw())
                self._slots.append(None)
                kind = "bytes"
            elif kind == "bytes" and stage.input_kind == "array":
                raise CodecError(
                    f"{stage.codec_id} needs an array but follows a byte-level stage; reorder the chain"
                )
            self.stages.append(stage)
            self._slots.append(index)
            kind = stage.output_kind
        if kind == "array":
            self.stages.append(Raw())
            self._slots.append(None)

    def _stage_state(self, state: CodecState, run_index: int) -> StageState:
        slot = self._slots[run_index]
        return state.stage(slot) if slot is not None else {}  # implicit raw stages keep nothing

    def find(self, cls: type[Codec]) -> tuple[int, Codec] | None:
        """(configured index, stage) of the first stage of type `cls`, or None. The index is the
        stage's slot in a CodecState: `state.stage(index)`."""
        for index, stage in enumerate(self.configured):
            if isinstance(stage, cls):
                return index, stage
        return None

    @property
    def primable(self) -> bool:
        """Whether the chain starts with `residual`, whose prediction `prime` can start."""
        from .residual import Residual

        return isinstance(self.configured[0], Residual)

    def prime(self, state: CodecState, reference: np.ndarray) -> None:
        """Start the leading `residual` stage's prediction at `reference` instead of zero.

        Both sides of a link must prime with the same reference (e.g. the initial model, which
        each builds from the plan's seed); the residual's checksum refuses a mismatch."""
        from .residual import prime_history

        if not self.primable:
            raise CodecError(f"priming needs a chain that starts with 'residual', got {self}")
        prime_history(state.stage(0), reference)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Chain:
        parts = [p for p in (s.strip() for s in text.split("|")) if p]
        if not parts:
            raise CodecError("empty codec chain")
        return cls([get_codec(parse_stage(p)) for p in parts])

    @classmethod
    def parse_stateless(cls, text: str, what: str, why: str) -> Chain | None:
        """The `what` chain, which must keep no state between messages (`why`), or None when `text` is blank."""
        if not text.strip():
            return None
        chain = cls.parse(text)
        if chain.stateful:
            raise CodecError(f"{what} {text!r} is stateful: {why}")
        return chain

    @classmethod
    def from_config(cls, config: Any) -> Chain:
        """From a chain string, a list of codec configs, or {"chain": [...]}."""
        if isinstance(config, Chain):
            return config
        if isinstance(config, str):
            return cls.parse(config)
        if isinstance(config, dict) and "chain" in config:
            config = config["chain"]
        if isinstance(config, dict):
            config = [config]
        if not isinstance(config, list) or not config:
            raise CodecError(
                f"a codec chain is a non-empty list of codec configs or a string, got {config!r}"
            )
        return cls([get_codec(c) for c in config])

    def get_config(self) -> list[dict[str, Any]]:
        return [s.get_config() for s in self.configured]

    def __str__(self) -> str:
        return " | ".join(str(s) for s in self.configured)

    @property
    def stateful(self) -> bool:
        return any(s.stateful for s in self.stages)

    @property
    def lossless(self) -> bool:
        return all(s.lossless for s in self.stages)

    def fingerprint(self, layout: Layout) -> int:
        return layout.fingerprint(self.get_config())

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, x: np.ndarray, layout: Layout, state: CodecState | None = None) -> Encoded:
        """Encode one message and advance the sender's state."""
        state = state if state is not None else CodecState()
        start = time.perf_counter()
        spec: Spec = ArraySpec(np.float32, layout.numel, layout)
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        spec.check(x, "model vector")
        if not np.isfinite(x).all():
            raise CodecError("input contains NaN or Inf; refusing to encode")

        ios: list[Data] = [x]  # ios[i] is stage i's input, ios[i + 1] its output
        specs: list[Spec] = [spec]
        sides: list[bytes] = []
        hints: list[object] = []
        stage_seconds: dict[str, float] = {}
        for i, stage in enumerate(self.stages):
            t0 = time.perf_counter()
            side, y, hint = stage.encode_with_hint(ios[i], specs[i], self._stage_state(state, i))
            out_spec = stage.output_spec(specs[i], side)
            ios.append(out_spec.check(y, f"{stage.codec_id} output"))
            specs.append(out_spec)
            sides.append(side)
            hints.append(hint)
            key = f"{i}:{stage.codec_id}"
            stage_seconds[key] = stage_seconds.get(key, 0.0) + time.perf_counter() - t0
        body = ios[-1]
        assert isinstance(body, bytes)
        data = self._frame(sides, body)

        # The receiver's view, for stateful stages and for the reported error.
        recon = self._reconstruct(sides, body, specs, state, known=ios, hints=hints)
        self._update(state, specs, recon, ios)
        x_hat = np.asarray(recon[0], dtype=np.float32)
        denom, error = squared_norms(x, x_hat)
        nmse = error / denom if denom > 0 and math.isfinite(denom) else error
        stats = EncodeStats(
            raw_bytes=layout.raw_bytes,
            wire_bytes=len(data),
            seconds=time.perf_counter() - start,
            nmse=nmse,
            stage_seconds=stage_seconds,
        )
        return Encoded(data=data, reconstruction=x_hat, stats=stats)

    def _reconstruct(
        self,
        sides: list[bytes],
        body: Data,
        specs: list[Spec],
        state: CodecState,
        known: list[Data] | None = None,
        hints: list[object] | None = None,
    ) -> list[Data]:
        """Decode backwards from the body; returns every stage's reconstructed input, and the body last.

        On the sender, `known` (each stage's actual input) stands in for lossless stages' decoding
        and `hints` (from `encode_with_hint`) spare the lossy ones re-deriving what they knew."""
        recon: list[Data] = [b""] * (len(self.stages) + 1)
        recon[-1] = body
        exact = True  # while every later stage was lossless, the sender's own inputs are the reconstruction
        for i in range(len(self.stages) - 1, -1, -1):
            stage = self.stages[i]
            if known is not None and exact and stage.lossless:
                recon[i] = known[i]
                continue
            exact = False
            hint = None if hints is None else hints[i]
            y = stage.decode(sides[i], recon[i + 1], specs[i], self._stage_state(state, i), hint)
            recon[i] = specs[i].check(y, f"{stage.codec_id} decode")
        return recon

    def _update(
        self, state: CodecState, specs: list[Spec], recon: list[Data], ios: list[Data] | None
    ) -> None:
        for i, stage in enumerate(self.stages):
            if stage.stateful:
                event = StageUpdate(
                    spec=specs[i],
                    x_hat=recon[i],
                    y_hat=recon[i + 1],
                    x=None if ios is None else ios[i],
                    y=None if ios is None else ios[i + 1],
                )
                stage.update(self._stage_state(state, i), event)
        state.messages += 1

    @staticmethod
    def _frame(sides: list[bytes], body: bytes) -> bytes:
        parts = [bytes([WIRE_VERSION])]
        for side in sides:
            parts.append(encode_varint(len(side)))
            parts.append(side)
        parts.append(body)
        return b"".join(parts)

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, data: bytes, layout: Layout, state: CodecState | None = None) -> np.ndarray:
        """Decode one message, checking every header against the expected layout, and advance the receiver's state."""
        state = state if state is not None else CodecState()
        data = bytes(data)
        if not data:
            raise CodecError("empty message")
        if data[0] != WIRE_VERSION:
            raise CodecError(f"unknown wire version {data[0]} (this build reads version {WIRE_VERSION})")
        pos = 1
        specs: list[Spec] = [ArraySpec(np.float32, layout.numel, layout)]
        sides: list[bytes] = []
        for i, stage in enumerate(self.stages):
            length, pos = decode_varint(data, pos, "chain header")
            if pos + length > len(data):
                raise CodecError(
                    f"{stage.codec_id}: header of {length} bytes runs past the end of the message"
                )
            side = data[pos : pos + length]
            pos += length
            specs.append(stage.output_spec(specs[i], side))
            sides.append(side)
        body = specs[-1].check(data[pos:], "message body")
        recon = self._reconstruct(sides, body, specs, state)
        self._update(state, specs, recon, None)
        out = np.asarray(recon[0])
        if out.dtype != np.float32 or out.shape != (layout.numel,):
            raise CodecError(f"decoded {out.shape} x {out.dtype}, layout needs ({layout.numel},) x float32")
        if not np.isfinite(out).all():
            raise CodecError("decoded model contains NaN or Inf")
        return out
