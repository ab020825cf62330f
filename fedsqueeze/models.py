"""Model registry. A plan names a model; architectures are data from this allow-list, never code.

- `mlp`: flatten -> hidden layers -> classes. On 8x8 digits with the default hidden=[200]
  it is 64-200-10 = 15,010 parameters, the size of seed 001's 784-20-10 MNIST classifier
  (15,910 parameters, which `mlp` with hidden=[20] gives on 28x28 input).
- `cnn`: two conv layers and a linear head; 1-D convolutions for (C, L) input such as
  MNIST-1D, 2-D for (C, H, W) images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsqueeze.codecs import Layout
from fedsqueeze.model_file import ModelError
from fedsqueeze.model_state import layout_of, load_vector, to_vector, travelling

__all__ = ["MODELS", "ModelError", "build_model", "get_flat", "model_layout", "set_flat"]


def _mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int] | None = None) -> nn.Module:
    sizes = [int(np.prod(input_shape))] + list(hidden if hidden is not None else [200])
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


def _cnn(
    input_shape: tuple[int, ...], num_classes: int, channels: list[int] | None = None, hidden: int = 64
) -> nn.Module:
    c1, c2 = channels if channels is not None else [16, 32]
    conv: Any = nn.Conv1d if len(input_shape) == 2 else nn.Conv2d
    pool: Any = nn.AdaptiveAvgPool1d(4) if len(input_shape) == 2 else nn.AdaptiveAvgPool2d(2)
    flat = c2 * 4
    return nn.Sequential(
        conv(input_shape[0], c1, 3, padding=1),
        nn.ReLU(),
        conv(c1, c2, 3, padding=1),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "cnn": _cnn}


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    args: dict[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    if name not in MODELS:
        raise ModelError(
            f"model {name!r} is not a built-in model ({', '.join(sorted(MODELS))}): for a model of your own, start the "
            "aggregator with --initial-model and the collaborators with --app (a plan never names code to load)"
        )
    if len(input_shape) not in (2, 3) and name == "cnn":
        raise ModelError(f"cnn needs (C, L) or (C, H, W) input, got {input_shape}")
    torch.manual_seed(seed)
    try:
        return MODELS[name](tuple(input_shape), num_classes, **(args or {}))
    except TypeError as exc:
        raise ModelError(f"model {name!r}: bad args {args}: {exc}") from exc


def model_layout(model: nn.Module) -> Layout:
    """The layout of a built-in model's travelling tensors (fedsqueeze/model_state.py)."""
    return layout_of(travelling(model))


def get_flat(model: nn.Module) -> np.ndarray:
    return to_vector(travelling(model))


def set_flat(model: nn.Module, flat: np.ndarray) -> None:
    """Copy a flat vector into the model's travelling tensors (never aliasing the caller's array)."""
    load_vector(travelling(model), flat, model)
