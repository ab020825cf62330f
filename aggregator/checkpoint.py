"""Atomic aggregator checkpoints: the one owner of their schema. One safetensors file per state directory.

`DIR/checkpoint.safetensors`, rewritten after every round (temp file in DIR, fsync, rename,
fsync of DIR), so a crash leaves either the previous checkpoint or the new one, never a torn file:

- tensors `model/<name>`: the global model, one tensor per layer of the model layout (float32);
- tensors `state/<n>`: uint8, each the safetensors bytes of a CodecState (`CodecState.to_bytes()`),
  every distinct one once: members that had the same downloads have equal downlink states (a
  model-sized residual history each), stored once however many members share it;
- tensor `server/update`: uint8, the CodecState bytes of the aggregator's own global-update chain
  (`downlink.update_chain`: its error-feedback memory), when there is one;
- tensor `server/optimizer`: uint8, the safetensors bytes of the server optimizer's moments
  (`aggregation.server_optimizer`: m and v), when it keeps any;
- metadata `fedsqueeze`: JSON with the format version, the round number, the plan's sha256,
  `states` ({collaborator id: [n of its uplink receiver state, n of its downlink sender state]}:
  residual predictors, installed autoencoder decoders; error feedback, the residual's copy),
  `membership` (members: ids, tokens, names, shard index, ...; joins so far; a member that left
  has no states), `prepass` (its bookkeeping), `report` (the run report's rounds, prepass bytes
  and extra fields so far).

Format 2 (one `state/<collaborator id>/up` and `.../down` pair per member) is still read.

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
FORMAT = 3  # 3: distinct states once (2: a pair per member; 1 counted the implicit raw stages in slots)
READS = (2, 3)


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
    distinct: dict[bytes, int] = {}  # equal states are usually one bytes object (Links.states): hashed once
    index = {
        cid: [distinct.setdefault(blob, len(distinct)) for blob in pair] for cid, pair in ckpt.states.items()
    }
    for blob, n in distinct.items():
        tensors[f"state/{n}"] = np.frombuffer(blob, dtype=np.uint8)
    if ckpt.server_state:
        tensors["server/update"] = np.frombuffer(ckpt.server_state, dtype=np.uint8)
    if ckpt.optimizer_state:
        tensors["server/optimizer"] = np.frombuffer(ckpt.optimizer_state, dtype=np.uint8)
    meta = {"format": FORMAT, "round": ckpt.round, "plan_sha256": ckpt.plan_sha256, "states": index,
            "membership": ckpt.membership, "prepass": ckpt.prepass, "report": ckpt.report}  # fmt: skip
    blob = st_save(tensors, metadata={"fedsqueeze": json.dumps(meta, separators=(",", ":"))})
    return _write_atomic(directory, FILENAME, blob)


def read(blob: bytes) -> tuple[dict[str, np.ndarray], Any]:
    """(tensors, the `fedsqueeze` metadata as parsed JSON) of a checkpoint file's bytes, unchecked;
    safetensors or JSON errors for bytes that are not one."""
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"]["fedsqueeze"])
    return st_load(blob), meta


def load(directory: Path, plan_sha256: str, layout: Layout) -> Checkpoint | None:
    """The checkpoint in `directory`, or None if there is none. Refuses another plan's checkpoint."""
    path = directory / FILENAME
    if not path.exists():
        return None
    try:
        tensors, meta = read(path.read_bytes())
    except Exception as exc:  # safetensors / JSON errors
        raise CheckpointError(f"{path} is not a readable fedsqueeze checkpoint: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path} is not a readable fedsqueeze checkpoint: its metadata is not an object"
        )
    if meta.get("format") not in READS:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format')!r}, this build reads {' and '.join(map(str, READS))}"
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
        states = _states_v2(tensors) if meta["format"] == 2 else _states(path, tensors, meta["states"])
        for m in membership["members"]:
            if m["active"] and m["id"] not in states:
                raise CheckpointError(f"{path}: codec states of {m['id']} are missing")
        server, optimizer = tensors.get("server/update"), tensors.get("server/optimizer")
        return Checkpoint(round=int(meta["round"]), plan_sha256=plan_sha256, global_model=model, states=states,
                          membership=membership, prepass=dict(meta.get("prepass", {})), report=dict(meta.get("report", {})),
                          server_state=b"" if server is None else server.tobytes(),
                          optimizer_state=b"" if optimizer is None else optimizer.tobytes())  # fmt: skip
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a field of the wrong type or missing
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed checkpoint: {exc!r}") from exc


def _states(
    path: Path, tensors: dict[str, np.ndarray], index: dict[str, list[int]]
) -> dict[str, tuple[bytes, bytes]]:
    """Each member's (up, down) state bytes; members sharing a stored state share one bytes object."""
    blobs: dict[int, bytes] = {}

    def blob(n: int) -> bytes:
        if n not in blobs:
            arr = tensors.get(f"state/{n}")
            if arr is None or arr.dtype != np.uint8:
                raise CheckpointError(f"{path}: codec state {n} is missing")
            blobs[n] = arr.tobytes()
        return blobs[n]

    out = {}
    for cid, pair in index.items():
        up, down = pair  # ValueError (malformed) unless two
        out[str(cid)] = (blob(int(up)), blob(int(down)))
    return out


def _states_v2(tensors: dict[str, np.ndarray]) -> dict[str, tuple[bytes, bytes]]:
    """Format 2: a `state/<id>/up` and `state/<id>/down` pair per member."""
    out = {}
    for key, arr in tensors.items():
        if key.startswith("state/") and key.endswith("/up"):
            cid = key.removeprefix("state/").removesuffix("/up")
            down = tensors.get(f"state/{cid}/down")
            if down is not None:
                out[cid] = (arr.tobytes(), down.tobytes())
    return out
