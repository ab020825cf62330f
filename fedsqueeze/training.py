"""Local training and evaluation with torch (CPU).

A classifier's output is (batch, classes) against labels (batch,); a language model's is (batch, time,
vocabulary) against next tokens (batch, time): its loss and accuracy are per token. Integer inputs
(token ids) and targets of any integer dtype are widened to int64 batch by batch, so a data set can
keep them as uint8."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

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
    steps: int = 0,
    optimizer: str = "sgd",
) -> dict[str, float]:
    """SGD for `epochs` over (x, y), or, with `steps` > 0, for that many batches (the data reshuffled
    whenever it runs out). `optimizer` "adam" is a fresh Adam (momentum unused). `on_step(epoch, batch)`
    runs after every optimizer step.

    With a `quantizer` (quantization-aware training, fedsqueeze/qat.py) every step's forward and
    backward pass sees the quantized weights, the step updates the float ones, and the model ends
    holding its quantized weights."""
    model.train()
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batches_per_epoch = -(-len(yt) // batch_size)
    if steps > 0:
        epochs = -(-steps // batches_per_epoch)
    total, correct, loss_sum, taken = 0, 0, 0.0, 0
    for epoch in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        for b, start in enumerate(range(0, len(yt), batch_size)):
            if steps > 0 and taken == steps:
                break
            idx = order[start : start + batch_size]
            opt.zero_grad()
            latent = quantizer.swap_in() if quantizer is not None else None
            out, target = scores_and_targets(model, xt[idx], yt[idx])
            loss = F.cross_entropy(out, target)
            loss.backward()
            if quantizer is not None and latent is not None:
                quantizer.restore(latent)
            opt.step()
            taken += 1
            loss_sum += loss.item() * len(target)
            correct += int((out.argmax(1) == target).sum())
            total += len(target)
            if callable(on_step):
                on_step(epoch, b)
    if quantizer is not None:
        quantizer.quantize()
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1), "samples": float(len(y))}


def scores_and_targets(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's scores as (predictions, classes) and the int64 targets (predictions,): one row per
    sample for a classifier, one per token for a language model."""
    out = model(x if x.is_floating_point() else x.long())
    if out.ndim == 3:
        return out.flatten(0, 1), y.flatten().long()
    return out, y.long()


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
    """(loss, accuracy) on a held-out set: per sample, or per token for a language model (perplexity: exp(loss))."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for start in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size])
        yb = torch.from_numpy(y[start : start + batch_size])
        out, target = scores_and_targets(model, xb, yb)
        loss_sum += float(F.cross_entropy(out, target, reduction="sum"))
        correct += int((out.argmax(1) == target).sum())
        n += len(target)
    n = max(n, 1)
    return loss_sum / n, correct / n
