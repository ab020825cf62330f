"""The aggregator's side of the prepass: PREPASS tasks, decoder uploads (validated, bound, installed).

The plan fixes the autoencoder's architecture, so the aggregator knows exactly which tensors an
uploaded decoder must hold. An upload is refused with INVALID_ARGUMENT when its architecture is
not the plan's (or its kind is not on the allow-list), when its bytes are not safetensors (a
pickle, say), when it has extra or missing keys, other dtypes or shapes, NaN or Inf, when it is
larger than the cap (the plan's decoder size plus 64 KiB for the header), or when its metadata
binds it to another collaborator's identity. A second upload from the same collaborator is
refused (ALREADY_EXISTS) unless `prepass.allow_retrain`. In shared mode only the designated
collaborator (the first to join) may upload (PERMISSION_DENIED otherwise).

An accepted decoder is installed in that collaborator's uplink CodecState, at the `ae` stage; in
shared mode in every collaborator's, and it is sent to the others with a PREPASS task whose
message is `shared-decoder` (its bytes count as prepass downlink). Decoder upload bytes go to
`decoder` in the report: the prepass's while the prepass runs, the open round's for a re-training.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from typing import TYPE_CHECKING, Any

from fedsqueeze.codecs import CodecError
from fedsqueeze.codecs.autoencoder import KINDS, Autoencoder, find_stage, validate_decoder
from fedsqueeze.errors import (
    AlreadyExists,
    FailedPrecondition,
    FederationError,
    InvalidArgument,
    PermissionDenied,
)
from fedsqueeze.wire import WirePayload, payload_wire_size

if TYPE_CHECKING:
    from .federation import Collaborator, Federation, Task

log = logging.getLogger("fedsqueeze.aggregator")

ROLE_TRAIN = "train-autoencoder"
ROLE_ENCODER = "train-encoder"
SHARED_DECODER = "shared-decoder"
HEADER_ALLOWANCE = 1 << 16


class Prepass:
    """Drives the prepass for a Federation; every method that touches shared state runs under fed._cond."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.spec = fed.plan.prepass
        found = find_stage(fed.up_chain)
        self.enabled = bool(self.spec.enabled and found is not None)
        self.index: int = found[0] if found is not None else -1
        self.stage: Autoencoder | None = found[1] if found is not None else None
        n = fed.layout.numel
        self.expected = self.stage.decoder_shapes(n) if self.stage else {}
        self.architecture = self.stage.architecture(n) if self.stage else {}
        self.max_bytes = (self.stage.decoder_nbytes(n) + HEADER_ALLOWANCE) if self.stage else 0
        self.shared = self.spec.decoder == "shared"
        self.running = False
        self.trainer: str | None = None  # shared mode: the collaborator that trains the decoder
        self.started: set[str] = set()  # sent the PREPASS task with the model
        self.installed: dict[str, int] = {}  # collaborator id -> decoder uploads accepted
        self.shared_tensors: dict[str, Any] | None = None
        self.shared_payload: WirePayload | None = None
        self.shared_sent: set[str] = set()

    # -- tasks ------------------------------------------------------------------------------------------
    def task_for(self, collab: Collaborator) -> Task | None:
        """The PREPASS task this collaborator needs now, if any (called under fed._cond)."""
        from .federation import Task

        if not self.enabled or not (self.running or self.fed.phase == "training"):
            return None
        fed = self.fed
        if collab.id not in self.started:
            self.started.add(collab.id)
            payload = fed._encode_downlink(collab, 0)
            fed.report.prepass_bytes["down_raw"] += fed.layout.raw_bytes
            fed.report.prepass_bytes["down_wire"] += payload_wire_size(payload)
            if self.shared and self.trainer is None:
                self.trainer = collab.id
            role = ROLE_ENCODER if self.shared and self.trainer != collab.id else ROLE_TRAIN
            return Task("PREPASS", round=0, model=payload, message=role)
        if self.shared and self.shared_payload is not None and collab.id != self.trainer and collab.id not in self.shared_sent:
            self.shared_sent.add(collab.id)
            assert self.shared_tensors is not None
            self._install(collab, self.shared_tensors)
            fed.report.prepass_bytes["down_raw"] += len(self.shared_payload.data)
            fed.report.prepass_bytes["down_wire"] += payload_wire_size(self.shared_payload)
            return Task("PREPASS", round=0, model=self.shared_payload, message=SHARED_DECODER)
        return None

    def ready(self, collab_id: str) -> bool:
        if self.shared:
            return collab_id in self.installed or collab_id in self.shared_sent
        return collab_id in self.installed

    # -- the phase ---------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Hold the rounds until every active collaborator has its decoder installed (or time runs out)."""
        if not self.enabled:
            return
        fed = self.fed
        timeout = max(fed.plan.round_timeout_s, 60.0) * 2
        with fed._cond:
            if self.shared and self.trainer is None and fed.active_ids():
                self.trainer = min(fed.active_ids())  # ids start with the join index: the first to join
            fed._phase = "prepass"
            self.running = True
            fed._cond.notify_all()
            deadline = time.monotonic() + timeout
            while not stop.is_set() and time.monotonic() < deadline:
                active = fed.active_ids()
                if active and all(self.ready(c) for c in active):
                    break
                fed._cond.wait(0.25)
            self.running = False
            missing = sorted(c for c in fed.active_ids() if not self.ready(c))
        fed.report.extra["prepass"] = {
            "decoder_mode": self.spec.decoder,
            "architecture": self.architecture,
            "decoder_bytes_each": self.max_bytes - HEADER_ALLOWANCE,
            "decoders": dict(self.installed),
            "shared_trainer": self.trainer,
            "missing": missing,
        }
        fed.report.write()
        if not self.installed and not stop.is_set():
            raise FederationError("prepass: no decoder was uploaded before the timeout")
        if missing:
            log.warning("prepass ended without a decoder for %s", missing)

    # -- uploads ----------------------------------------------------------------------------------------
    def upload(self, collab: Collaborator, architecture: dict[str, Any], blob: bytes) -> int:
        if not self.enabled:
            raise FailedPrecondition("this federation's plan has no prepass: no decoder is expected")
        self._check_architecture(architecture)
        fed = self.fed
        with fed._cond:
            if self.shared and self.trainer is not None and collab.id != self.trainer:
                raise PermissionDenied(f"shared decoder mode: only {self.trainer} uploads the decoder")
            if collab.id in self.installed and not self.spec.allow_retrain:
                raise AlreadyExists(f"{collab.id} already uploaded its decoder; the plan does not allow re-training")
        try:
            tensors, meta = validate_decoder(blob, self.expected, self.max_bytes)
        except CodecError as exc:
            raise InvalidArgument(f"decoder rejected: {exc}") from exc
        owner = meta.get("collaborator_id", "")
        if owner != collab.id:
            raise InvalidArgument(
                f"decoder rejected: it is bound to collaborator {owner or '(none)'!r}, but was uploaded with the credentials of {collab.id}"
            )
        with fed._cond:
            if collab.id in self.installed and not self.spec.allow_retrain:
                raise AlreadyExists(f"{collab.id} already uploaded its decoder; the plan does not allow re-training")
            self._install(collab, tensors)
            self.installed[collab.id] = self.installed.get(collab.id, 0) + 1
            rnd = fed._round
            target = rnd.bytes if (rnd is not None and not self.running) else fed.report.prepass_bytes
            target["decoder"] += len(blob)
            collab.decoder_bytes += len(blob)
            fed.metrics.record_decoder(fed.up_codec, collab.id, len(blob))
            if self.shared:
                self.trainer = collab.id
                self.shared_tensors = tensors
                self.shared_payload = WirePayload(data=bytes(blob), fingerprint=zlib.crc32(blob))
                self.shared_sent.clear()
            fed._cond.notify_all()
        log.info("decoder from %s accepted (%d bytes)", collab.id, len(blob))
        return len(blob)

    def _check_architecture(self, architecture: dict[str, Any]) -> None:
        kind = architecture.get("kind", "")
        if kind not in KINDS:
            raise InvalidArgument(f"decoder kind {kind!r} is not on the allow-list {list(KINDS)}")
        try:
            sizes = {str(k): int(v) for k, v in (architecture.get("sizes") or {}).items()}
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"decoder sizes must be integers: {exc}") from exc
        if kind != self.architecture["kind"] or sizes != self.architecture["sizes"]:
            raise InvalidArgument(f"decoder architecture {kind} {sizes} is not the plan's {self.architecture}")

    def _install(self, collab: Collaborator, tensors: dict[str, Any]) -> None:
        with collab.lock:
            collab.up_state.stage(self.index).update(tensors)
