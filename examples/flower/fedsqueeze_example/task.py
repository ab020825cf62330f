"""The learning task: scikit-learn's handwritten digits (bundled, nothing downloaded) and a small MLP."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def make_model(seed: int) -> nn.Module:
    """64-200-10 MLP (15,010 parameters); the same seed gives the same initial weights everywhere."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 10))


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """80 % train, 20 % test, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)
    cut = int(0.8 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def load_partition(partition_id: int, num_partitions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """This node's IID shard of the training split."""
    x, y, _, _ = load_split(seed)
    shards = np.array_split(np.arange(len(y)), num_partitions)
    return x[shards[partition_id]], y[shards[partition_id]]


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
) -> float:
    """Local SGD; returns the mean training loss of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        for batch in torch.randperm(len(ys), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    return float(np.mean(losses))


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) on (x, y)."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        accuracy = float((logits.argmax(1).numpy() == y).mean())
    return loss, accuracy
