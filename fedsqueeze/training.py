"""Local training and evaluation with torch (CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # at run time this module needs numpy and torch only: bench/flower loads it by path
    from fedsqueeze.qat import WeightQuantizer


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_step: object = None,
    quantizer: WeightQuantizer | None = None,
) -> dict[str, float]:
    """SGD for `epochs` over (x, y). `on_step(epoch, batch)` runs after every optimizer step.

    With a `quantizer` (quantization-aware training, fedsqueeze/qat.py) every step's forward and
    backward pass sees the quantized weights, the step updates the float ones, and the model ends
    holding its quantized weights."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()
    total, correct, loss_sum = 0, 0, 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        for b, start in enumerate(range(0, len(yt), batch_size)):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            latent = quantizer.swap_in() if quantizer is not None else None
            out = model(xt[idx])
            loss = loss_fn(out, yt[idx])
            loss.backward()
            if quantizer is not None and latent is not None:
                quantizer.restore(latent)
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yt[idx]).sum())
            total += len(idx)
            if callable(on_step):
                on_step(epoch, b)
    if quantizer is not None:
        quantizer.quantize()
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1), "samples": float(len(y))}


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
    """(loss, accuracy) on a held-out set."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size])
        yb = torch.from_numpy(y[start : start + batch_size])
        out = model(xb)
        loss_sum += float(loss_fn(out, yb))
        correct += int((out.argmax(1) == yb).sum())
    n = max(len(y), 1)
    return loss_sum / n, correct / n
