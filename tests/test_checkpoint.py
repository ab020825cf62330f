"""Aggregator checkpoints on disk: what is stored, older formats, and damaged files refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from fedsqueeze.aggregator import checkpoint

from .test_links import make_links


def write(folder: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    (folder / checkpoint.FILENAME).write_bytes(save(tensors, metadata={"fedsqueeze": json.dumps(meta)}))


def test_a_format_2_checkpoint_a_state_pair_per_member_is_still_read(tmp_path: Path) -> None:
    links, _, layout, initial = make_links(2)
    states = links.states(["m0", "m1"])
    tensors = {f"model/{t.name}": initial[sl].reshape(t.shape) for t, sl in layout.slices()}
    for member, (up, down) in states.items():
        tensors[f"state/{member}/up"] = np.frombuffer(up, np.uint8)
        tensors[f"state/{member}/down"] = np.frombuffer(down, np.uint8)
    members = [{"id": "m0", "active": True}, {"id": "m1", "active": True}, {"id": "left", "active": False}]
    meta = {"format": 2, "round": 1, "plan_sha256": "plan", "membership": {"members": members, "joined": 3}}
    write(tmp_path, tensors, meta)
    loaded = checkpoint.load(tmp_path, "plan", layout)
    assert loaded is not None and loaded.states == states and np.array_equal(loaded.global_model, initial)
    members[0]["id"] = "m2"  # an active member without states
    write(tmp_path, tensors, meta)
    with pytest.raises(checkpoint.CheckpointError, match="codec states of m2 are missing"):
        checkpoint.load(tmp_path, "plan", layout)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda blob, meta, tensors: blob[: len(blob) // 2], "is not a readable fedsqueeze checkpoint"),
        (
            lambda blob, meta, tensors: meta.update(format=99),
            "has checkpoint format 99, this build reads 2 and 3",
        ),
        (lambda blob, meta, tensors: meta.update(states=[0, 1]), "malformed checkpoint"),
        (lambda blob, meta, tensors: meta["states"].update(m0=[0]), "malformed checkpoint"),
        (lambda blob, meta, tensors: meta["states"].update(m0=[0, 7]), "codec state 7 is missing"),
        (lambda blob, meta, tensors: tensors.pop("model/w"), "tensor model/w is missing"),
        (lambda blob, meta, tensors: meta.pop("membership"), "malformed checkpoint"),
        (lambda blob, meta, tensors: meta["membership"].update(members=["m0"]), "malformed checkpoint"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_what_is_wrong(tmp_path: Path, damage, message: str) -> None:
    links, _, layout, initial = make_links(2)
    members = {"members": [{"id": m, "active": True} for m in ("m0", "m1")], "joined": 2}
    ckpt = checkpoint.Checkpoint(1, "plan", initial, links.states(["m0", "m1"]), members)
    path = checkpoint.save(tmp_path, ckpt, layout)
    blob = path.read_bytes()
    tensors, meta = checkpoint.read(blob)
    damaged = damage(blob, meta, tensors)
    if isinstance(damaged, bytes):
        path.write_bytes(damaged)
    else:
        write(tmp_path, tensors, meta)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(tmp_path, "plan", layout)
