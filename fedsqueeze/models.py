"""Model registry. A plan names a model; architectures are data from this allow-list, never code.

- `mlp`: flatten -> hidden layers -> classes. On 8x8 digits with the default hidden=[200]
  it is 64-200-10 = 15,010 parameters, the size of seed 001's 784-20-10 MNIST classifier
  (15,910 parameters, which `mlp` with hidden=[20] gives on 28x28 input).
- `cnn`: two conv layers and a linear head; 1-D convolutions for (C, L) input such as
  MNIST-1D, 2-D for (C, H, W) images.
- `transformer`: a GPT-style decoder-only language model over (T,) token windows (the `stdlib`
  data set): token and learned position embeddings, pre-norm causal self-attention blocks, an output
  head tied to the token embedding. The defaults (d_model 128, 6 layers, 4 heads) on 64-byte windows of
  a 256-byte vocabulary are 1,230,848 parameters. TorchScript-able (the Flower peer loads it so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

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


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # type: ignore[no-any-return]


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))  # type: ignore[no-any-return]


class TransformerLM(nn.Module):
    """(batch, time) token ids -> (batch, time, vocabulary) logits of the next token."""

    def __init__(
        self, vocabulary: int, context: int, d_model: int = 128, layers: int = 6, heads: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList([TransformerBlock(d_model, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocabulary, bias=False)
        self.head.weight = self.embed.weight  # tied: travels once
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # type: ignore[no-any-return]


def _transformer(input_shape: tuple[int, ...], num_classes: int, d_model: int = 128, layers: int = 6,
                 heads: int = 4) -> nn.Module:  # fmt: skip
    if len(input_shape) != 1:
        raise ModelError(f"transformer needs (T,) token windows, got input shape {input_shape}")
    try:
        return TransformerLM(num_classes, input_shape[0], d_model, layers, heads)
    except ValueError as exc:
        raise ModelError(f"transformer: {exc}") from exc


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer}


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
