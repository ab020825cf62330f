"""A torch model's federated state: which of its tensors travel, as one flat float32 vector, and back.

What travels (plan `model.buffers`):
- every parameter, in the order of the model's `state_dict`, tied parameters once (under their first name);
- floating-point buffers (BatchNorm's running mean and variance, ...) too with `"average"` (the
  default: averaged like the weights), or none with `"local"` (FedBN: each collaborator keeps its own
  normalisation statistics);
- integer buffers (BatchNorm's `num_batches_tracked`, ...) never: they count local steps.
Tensors keep their dtype and device in the model: the vector is float32 on the CPU (fp16, bf16 and
fp64 values are converted to float32 on the way out, and back to the tensor's dtype on the way in),
and the layout records each tensor's dtype, so a collaborator whose model differs in any tensor's
name, shape or dtype is told which.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedsqueeze.codecs import Layout

BufferRule = Literal["average", "local"]


def travelling(model: nn.Module, buffers: BufferRule = "average") -> dict[str, torch.Tensor]:
    """The tensors of `model` that travel, by name, in state_dict order."""
    parameters = {id(p) for p in model.parameters()}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue  # a tied tensor travels once
        seen.add(id(tensor))
        if id(tensor) in parameters:
            out[name] = tensor
        elif buffers == "average" and tensor.is_floating_point():
            out[name] = tensor
    return out


def buffer_names(model: nn.Module) -> list[str]:
    """The floating-point buffers of `model` (what `buffers` decides about)."""
    parameters = {id(p) for p in model.parameters()}
    return [
        n
        for n, t in model.state_dict(keep_vars=True).items()
        if id(t) not in parameters and t.is_floating_point()
    ]


def layout_of(tensors: Mapping[str, torch.Tensor]) -> Layout:
    return Layout.of(tensors, dtypes=True)


def to_vector(tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The tensors as one float32 vector on the CPU (a copy)."""
    if not tensors:
        return np.zeros(0, np.float32)
    with torch.no_grad():
        parts = [t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors.values()]
        return torch.cat(parts).numpy().astype(np.float32, copy=True)


def load_vector(
    tensors: Mapping[str, torch.Tensor], vector: np.ndarray, model: nn.Module | None = None
) -> None:
    """Copy a flat float32 vector into the tensors, each on its own device and in its own dtype.

    With `model`, its normalisation layers' running variances are then clamped at zero: a lossy
    link can leave a small variance slightly negative, which would make evaluation NaN."""
    vec = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for t in tensors.values():
            n = t.numel()
            t.copy_(vec[offset : offset + n].view(t.shape).to(t.device, t.dtype))
            offset += n
    if offset != vec.numel():
        raise ValueError(f"the vector has {vec.numel()} elements, the model's travelling tensors {offset}")
    if model is not None:
        clamp_variances(model)


def clamp_variances(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            variance = getattr(module, "running_var", None)
            if isinstance(module, nn.modules.batchnorm._NormBase) and isinstance(variance, torch.Tensor):
                variance.clamp_(min=0.0)


def as_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """CPU float32 copies of the tensors, for a model file or an evaluation function."""
    return {n: t.detach().to("cpu", torch.float32).numpy().copy() for n, t in tensors.items()}
