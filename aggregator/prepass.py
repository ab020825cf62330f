"""The aggregator's side of the prepass: who gets which PREPASS task, and decoder uploads (validated, bound).

The plan fixes the autoencoder's architecture, so the aggregator knows exactly which tensors an
uploaded decoder must hold. An upload is refused with INVALID_ARGUMENT when its architecture is
not the plan's (or its kind is not on the allow-list), when its bytes are not safetensors (a
pickle, say), when it has extra or missing keys, other dtypes or shapes, NaN or Inf, when it is
larger than the cap (the plan's decoder size plus 64 KiB for the header), or when its metadata
binds it to another collaborator's identity. A second upload from the same collaborator is
refused (ALREADY_EXISTS) unless `prepass.allow_retrain`, and more than `prepass.max_retrains`
re-uploads are refused (FAILED_PRECONDITION). In shared mode only the designated
collaborator (the first to join) may upload (PERMISSION_DENIED otherwise).

An accepted decoder is installed in that collaborator's uplink CodecState, at the `ae` stage; in
shared mode in every collaborator's, and it is sent to the others with a PREPASS task whose
message is `shared-decoder` (its bytes count as prepass downlink).

`Prepass` keeps the bookkeeping only; the Federation drives it (under its lock, except
`validate`) and does the encoding and installing through its links.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from fedsqueeze.codecs import Chain, CodecError, Layout, StageState
from fedsqueeze.codecs.autoencoder import KINDS, Autoencoder, decoder_chain, find_stage, validate_decoder
from fedsqueeze.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from fedsqueeze.payload import Payload
from fedsqueeze.plan import PrepassSpec

ROLE_TRAIN = "train-autoencoder"
ROLE_ENCODER = "train-encoder"
SHARED_DECODER = "shared-decoder"
HEADER_ALLOWANCE = 1 << 16


@dataclass
class PrepassTask:
    """What one member needs now: the model to run its local prepass on (`role`), or the shared decoder."""

    role: str  # ROLE_TRAIN | ROLE_ENCODER | SHARED_DECODER
    decoder: Payload | None = None  # SHARED_DECODER: the decoder's safetensors bytes
    tensors: StageState | None = None  # SHARED_DECODER: the same, to install in the member's uplink state


class Prepass:
    def __init__(self, spec: PrepassSpec, uplink: Chain, layout: Layout) -> None:
        self.spec = spec
        found = find_stage(uplink)
        self.enabled = bool(spec.enabled and found is not None)
        # the `ae` stage's slot in an uplink CodecState
        self.index: int = found[0] if found is not None else -1
        self.stage: Autoencoder | None = found[1] if found is not None else None
        n = layout.numel
        self.expected = self.stage.decoder_shapes(n) if self.stage else {}
        self.architecture = self.stage.architecture(n) if self.stage else {}
        # No autoencoder, no decoder bytes at all.
        self.max_bytes = (
            (self.stage.decoder_nbytes(n) + HEADER_ALLOWANCE) if self.enabled and self.stage else 0
        )
        self.shared = spec.decoder == "shared"
        self.chain = decoder_chain(spec.decoder_chain)  # what uploads travel through (None: raw fp32)
        self.running = False  # the prepass phase holds the rounds
        self.done = False  # the phase has ended (checkpointed: a restart does not run it again)
        self.trainer: str | None = None  # shared mode: the member that trains the decoder
        self.started: set[str] = set()  # sent the PREPASS task with the model
        self.installed: dict[str, int] = {}  # member id -> decoder uploads accepted
        self.shared_tensors: StageState | None = None
        self.shared_payload: Payload | None = None
        self.shared_sent: set[str] = set()

    # -- the phase (under the federation's lock) -------------------------------------------------
    def begin(self, active: set[str]) -> None:
        if self.shared and self.trainer is None and active:
            self.trainer = min(active)  # ids start with the join index: the first to join
        self.running = True

    def end(self, active: set[str]) -> dict[str, Any]:
        """Close the phase; what the run report says about it."""
        self.running, self.done = False, True
        return {
            "decoder_mode": self.spec.decoder,
            "architecture": self.architecture,
            "decoder_bytes_each": self.max_bytes - HEADER_ALLOWANCE,  # fp32, before the decoder chain
            "decoder_chain": str(self.chain) if self.chain is not None else "",
            "decoders": dict(self.installed),
            "shared_trainer": self.trainer,
            "missing": sorted(m for m in active if not self.ready(m)),
        }

    def ready(self, member_id: str) -> bool:
        if self.shared:
            return member_id in self.installed or member_id in self.shared_sent
        return member_id in self.installed

    def task_for(self, member_id: str, training: bool) -> PrepassTask | None:
        """The PREPASS task this member needs now, if any (`training`: the rounds have started, for late joiners)."""
        if not self.enabled or not (self.running or training):
            return None
        if member_id not in self.started:
            self.started.add(member_id)
            if self.shared and self.trainer is None:
                self.trainer = member_id
            return PrepassTask(ROLE_ENCODER if self.shared and self.trainer != member_id else ROLE_TRAIN)
        if (
            self.shared
            and self.shared_payload is not None
            and member_id != self.trainer
            and member_id not in self.shared_sent
        ):
            self.shared_sent.add(member_id)
            return PrepassTask(SHARED_DECODER, self.shared_payload, self.shared_tensors)
        return None

    # -- decoder uploads --------------------------------------------------------------------------
    def check_upload(self, member_id: str, architecture: dict[str, Any]) -> None:
        """Refuse an upload this member may not make (under the federation's lock)."""
        if not self.enabled:
            raise FailedPrecondition("this federation's plan has no prepass: no decoder is expected")
        kind = architecture.get("kind", "")
        if kind not in KINDS:
            raise InvalidArgument(f"decoder kind {kind!r} is not on the allow-list {list(KINDS)}")
        try:
            sizes = {str(k): int(v) for k, v in (architecture.get("sizes") or {}).items()}
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"decoder sizes must be integers: {exc}") from exc
        if kind != self.architecture["kind"] or sizes != self.architecture["sizes"]:
            raise InvalidArgument(
                f"decoder architecture {kind} {sizes} is not the plan's {self.architecture}"
            )
        if self.shared and self.trainer is not None and member_id != self.trainer:
            raise PermissionDenied(f"shared decoder mode: only {self.trainer} uploads the decoder")
        uploads = self.installed.get(member_id, 0)
        if uploads and not self.spec.allow_retrain:
            raise AlreadyExists(
                f"{member_id} already uploaded its decoder; the plan does not allow re-training"
            )
        if uploads > self.spec.max_retrains:
            raise FailedPrecondition(
                f"{member_id} has re-uploaded its decoder {uploads - 1} times, the plan allows {self.spec.max_retrains}"
            )

    def validate(self, member_id: str, blob: bytes) -> StageState:
        """The decoder's tensors, checked against the plan and bound to `member_id` (no lock needed)."""
        try:
            tensors, meta = validate_decoder(blob, self.expected, self.max_bytes, self.chain)
        except CodecError as exc:
            raise InvalidArgument(f"decoder rejected: {exc}") from exc
        owner = meta.get("collaborator_id", "")
        if owner != member_id:
            raise InvalidArgument(
                f"decoder rejected: it is bound to collaborator {owner or '(none)'!r}, but was uploaded with the credentials of {member_id}"
            )
        return tensors

    def accepted(self, member_id: str, tensors: StageState, blob: bytes) -> None:
        """Record an installed decoder (under the federation's lock); in shared mode it goes to everyone else."""
        self.installed[member_id] = self.installed.get(member_id, 0) + 1
        if self.shared:
            self.trainer = member_id
            self.shared_tensors = tensors
            self.shared_payload = Payload(data=bytes(blob), fingerprint=zlib.crc32(blob))
            self.shared_sent.clear()

    # -- checkpoints ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"done": self.done, "started": sorted(self.started), "installed": dict(self.installed),
                "trainer": self.trainer, "shared_sent": sorted(self.shared_sent)}  # fmt: skip

    def restore(self, data: dict[str, Any]) -> None:
        self.done = bool(data.get("done", False))
        self.started = set(data.get("started", []))
        self.installed = {str(k): int(v) for k, v in data.get("installed", {}).items()}
        self.trainer = data.get("trainer")
        self.shared_sent = set(data.get("shared_sent", []))
