"""A model's initial weights as a safetensors file: what `aggregator serve --initial-model` reads.

The aggregator needs no model code, no torch and no data: only the tensors' names, shapes, dtypes
and initial values, in the order collaborators flatten them. `save_initial_model` (with torch, on
the user's side) writes the travelling tensors of a model (fedsqueeze/model_state.py) and records
their order in the file's metadata; `load_initial_model` reads it back with numpy alone (float32,
float16, bfloat16 and float64 tensors), refusing anything else with a message naming the problem.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedsqueeze.codecs import CodecError, Layout
from fedsqueeze.codecs.autoencoder import read_safetensors_header
from fedsqueeze.codecs.cast import from_bf16
from fedsqueeze.codecs.layout import TensorInfo

ORDER_KEY = "fedsqueeze.order"  # metadata: the tensors' names in flattening order (JSON list)
BUFFERS_KEY = "fedsqueeze.buffers"  # metadata: which tensors are buffers (JSON list), dropped under "local"
# safetensors dtype -> (numpy dtype of the stored bytes, layout dtype)
DTYPES = {
    "F32": ("<f4", "float32"),
    "F16": ("<f2", "float16"),
    "BF16": ("<u2", "bfloat16"),
    "F64": ("<f8", "float64"),
}
MAX_HEADER = 100 << 20


class ModelError(ValueError):
    """A model that cannot be built or used: not a built-in one, bad arguments, a layout that differs."""


class ModelFileError(ModelError):
    """An initial-model file that cannot be used."""


def save_initial_model(model: Any, path: str | Path) -> Path:
    """Write `model`'s parameters and floating-point buffers (their order, which are buffers) for the aggregator.

    One file serves either buffer rule: under `"local"` the aggregator leaves the buffers out.
    """
    from safetensors.torch import save_file

    from fedsqueeze.model_state import buffer_names, travelling

    tensors = travelling(model, "average")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {ORDER_KEY: json.dumps(list(tensors)), BUFFERS_KEY: json.dumps(buffer_names(model))}
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(path), metadata=metadata)
    return path


def load_initial_model(path: str | Path) -> tuple[Layout, np.ndarray, tuple[str, ...]]:
    """(layout, flat float32 weights, names of the buffers) of an initial-model file; ModelFileError otherwise."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read the initial model {path}: {exc.strerror}") from exc
    try:
        header = read_safetensors_header(blob, MAX_HEADER)
    except CodecError as exc:
        raise ModelFileError(f"{path}: {str(exc).replace('decoder', 'model file')}") from exc
    meta = header.pop("__metadata__", None) or {}
    order = _order(meta, header, path)
    body = 8 + int.from_bytes(blob[:8], "little")
    infos, parts = [], []
    for name in order:
        spec = header[name]
        if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
            dtype = spec.get("dtype") if isinstance(spec, dict) else spec
            raise ModelFileError(f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(DTYPES)}")
        stored, dtype = DTYPES[spec["dtype"]]
        shape = tuple(int(d) for d in spec.get("shape", []))
        start, end = (int(v) for v in spec.get("data_offsets", (0, -1)))
        if (
            not 0 <= start <= end
            or body + end > len(blob)
            or end - start != math.prod(shape) * np.dtype(stored).itemsize
        ):
            raise ModelFileError(
                f"{path}: tensor {name!r} has offsets that do not fit its shape {list(shape)}"
            )
        raw = np.frombuffer(blob, dtype=stored, count=math.prod(shape), offset=body + start)
        values = from_bf16(raw) if dtype == "bfloat16" else raw.astype(np.float32)
        if not np.isfinite(values).all():
            raise ModelFileError(f"{path}: tensor {name!r} contains NaN or Inf")
        infos.append(TensorInfo(name, shape, dtype))
        parts.append(np.asarray(values, dtype=np.float32).reshape(-1))
    if not infos:
        raise ModelFileError(f"{path}: the file holds no tensors")
    layout = Layout(tuple(infos))
    return layout, np.concatenate(parts), _buffers(meta, order, path)


def _order(meta: dict[str, Any], header: dict[str, Any], path: Path) -> list[str]:
    if ORDER_KEY not in meta:
        return sorted(header)  # a file not written by save_initial_model: flatten by name
    try:
        order = json.loads(meta[ORDER_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: metadata {ORDER_KEY} is not a JSON list") from exc
    if not isinstance(order, list) or sorted(order) != sorted(header):
        raise ModelFileError(f"{path}: metadata {ORDER_KEY} does not list exactly the file's tensors")
    return [str(n) for n in order]


def _buffers(meta: dict[str, Any], order: list[str], path: Path) -> tuple[str, ...]:
    try:
        names = json.loads(meta.get(BUFFERS_KEY, "[]"))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: metadata {BUFFERS_KEY} is not a JSON list") from exc
    if not isinstance(names, list) or not set(map(str, names)) <= set(order):
        raise ModelFileError(f"{path}: metadata {BUFFERS_KEY} names tensors the file does not hold")
    return tuple(str(n) for n in names)
