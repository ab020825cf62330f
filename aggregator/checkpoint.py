"""Atomic aggregator checkpoints: the one owner of their schema. One safetensors file per state directory.

`DIR/checkpoint.safetensors`, rewritten after every round (temp file in DIR, fsync, rename,
fsync of DIR), so a crash leaves either the previous checkpoint or the new one, never a torn file:

- tensors `model/<name>`: the global model, one tensor per layer of the model layout (float32);
- tensors `state/<collaborator id>/up` and `.../down`: uint8, each the safetensors bytes of that
  collaborator's CodecState (`CodecState.to_bytes()`): the uplink receiver side (residual
  predictors, installed autoencoder decoders) and the downlink sender side (error feedback);
- tensor `server/update`: uint8, the CodecState bytes of the aggregator's own global-update chain
  (`downlink.update_chain`: its error-feedback memory), when there is one;
- tensor `server/optimizer`: uint8, the safetensors bytes of the server optimizer's moments
  (`aggregation.server_optimizer`: m and v), when it keeps any;
- metadata `fedsqueeze`: JSON with the format version, the round number, the plan's sha256,
  `membership` (members: ids, tokens, names, shard index, ...; joins so far), `prepass` (its
  bookkeeping), `report` (the run report's rounds, prepass bytes and extra fields so far).

It holds the session tokens: the file is created with mode 0600. Nothing is pickled.

`DIR/decoders/<member id, hex>.<n>.safetensors`: the n-th decoder upload a member made, its bytes as
received, written (atomically, 0600) when it is accepted. Decoders are re-uploaded in the middle of
rounds, between checkpoints: a restart re-installs those newer than the checkpoint's count (after
checking them again), so the aggregator decodes with the AE the collaborator has kept.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedsqueeze.codecs import Layout

FILENAME = "checkpoint.safetensors"
DECODERS = "decoders"  # accepted decoder uploads, kept between checkpoints
FORMAT = 2  # 2: CodecState slots are configured stages (1 counted the implicit raw stages)


class CheckpointError(ValueError):
    """The state directory holds a checkpoint that cannot be resumed (other plan, corrupt)."""


@dataclass
class Checkpoint:
    round: int  # rounds completed; a restart resumes at round + 1
    plan_sha256: str
    global_model: np.ndarray
    states: dict[str, tuple[bytes, bytes]]  # collaborator id -> (up, down) CodecState bytes
    membership: dict[str, Any]  # Membership.to_json()
    prepass: dict[str, Any] = field(default_factory=dict)  # Prepass.to_json()
    report: dict[str, Any] = field(default_factory=dict)  # rounds, prepass_bytes, extra
    server_state: bytes = b""  # the aggregator's global-update CodecState (empty: none)
    optimizer_state: bytes = b""  # the server optimizer's moments (empty: none)


def _write_atomic(directory: Path, name: str, blob: bytes) -> Path:
    """Write `blob` to directory/name, mode 0600: temp file, fsync, rename, fsync of the directory."""
    path = directory / name
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_decoder(directory: Path, member_id: str, count: int, blob: bytes) -> Path:
    """Keep a member's `count`-th accepted decoder upload (its bytes as received)."""
    folder = directory / DECODERS
    folder.mkdir(parents=True, exist_ok=True)
    return _write_atomic(folder, f"{member_id.encode().hex()}.{count}.safetensors", blob)


def decoders_since(directory: Path, counts: dict[str, int]) -> dict[str, list[tuple[int, Path]]]:
    """Per member, the files of the uploads kept after its count in `counts` (the checkpoint's), oldest first."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted((directory / DECODERS).glob("*.*.safetensors")):
        hex_id, number = path.name.split(".")[:2]
        try:
            member_id, count = bytes.fromhex(hex_id).decode(), int(number)
        except ValueError as exc:
            raise CheckpointError(f"{path}: not a decoder file this build wrote") from exc
        if count > counts.get(member_id, 0):
            found.setdefault(member_id, []).append((count, path))
    return {m: sorted(uploads) for m, uploads in found.items()}


def save(directory: Path, ckpt: Checkpoint, layout: Layout) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for t, sl in layout.slices():
        tensors[f"model/{t.name}"] = np.ascontiguousarray(ckpt.global_model[sl].reshape(t.shape))
    for cid, (up, down) in ckpt.states.items():
        tensors[f"state/{cid}/up"] = np.frombuffer(up, dtype=np.uint8)
        tensors[f"state/{cid}/down"] = np.frombuffer(down, dtype=np.uint8)
    if ckpt.server_state:
        tensors["server/update"] = np.frombuffer(ckpt.server_state, dtype=np.uint8)
    if ckpt.optimizer_state:
        tensors["server/optimizer"] = np.frombuffer(ckpt.optimizer_state, dtype=np.uint8)
    meta = {"format": FORMAT, "round": ckpt.round, "plan_sha256": ckpt.plan_sha256, "membership": ckpt.membership,
            "prepass": ckpt.prepass, "report": ckpt.report}  # fmt: skip
    blob = st_save(tensors, metadata={"fedsqueeze": json.dumps(meta, separators=(",", ":"))})
    return _write_atomic(directory, FILENAME, blob)


def load(directory: Path, plan_sha256: str, layout: Layout) -> Checkpoint | None:
    """The checkpoint in `directory`, or None if there is none. Refuses another plan's checkpoint."""
    path = directory / FILENAME
    if not path.exists():
        return None
    blob = path.read_bytes()
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"]["fedsqueeze"])
    except Exception as exc:  # safetensors / JSON errors
        raise CheckpointError(f"{path} is not a readable fedsqueeze checkpoint: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format')!r}, this build reads {FORMAT}"
        )
    if meta.get("plan_sha256") != plan_sha256:
        raise CheckpointError(
            f"{path} belongs to plan {str(meta.get('plan_sha256'))[:12]}…, not to this plan {plan_sha256[:12]}…: "
            "refusing to resume another federation (use another --state-dir, or the same plan)"
        )
    parts = []
    for t in layout:
        arr = tensors.get(f"model/{t.name}")
        if arr is None or tuple(arr.shape) != tuple(t.shape) or arr.dtype != np.float32:
            raise CheckpointError(f"{path}: tensor model/{t.name} is missing or has the wrong shape/dtype")
        parts.append(arr.reshape(-1))
    model = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    try:
        membership = meta["membership"]
        states: dict[str, tuple[bytes, bytes]] = {}
        for m in membership["members"]:
            cid = m["id"]
            up, down = tensors.get(f"state/{cid}/up"), tensors.get(f"state/{cid}/down")
            if up is None or down is None:
                raise CheckpointError(f"{path}: codec states of {cid} are missing")
            states[cid] = (up.tobytes(), down.tobytes())
        server, optimizer = tensors.get("server/update"), tensors.get("server/optimizer")
        return Checkpoint(round=int(meta["round"]), plan_sha256=plan_sha256, global_model=model, states=states,
                          membership=membership, prepass=dict(meta.get("prepass", {})), report=dict(meta.get("report", {})),
                          server_state=b"" if server is None else server.tobytes(),
                          optimizer_state=b"" if optimizer is None else optimizer.tobytes())  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed checkpoint: {exc!r}") from exc
