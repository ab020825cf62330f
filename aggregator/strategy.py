"""Aggregation strategies. FedAvg streams: a running weighted sum, never a list of updates."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Strategy(ABC):
    """Combines the updates of one round into the next global model."""

    @abstractmethod
    def begin(self, global_model: np.ndarray) -> None:
        """Start a round from the current global model."""

    @abstractmethod
    def accumulate(self, update: np.ndarray, weight: float) -> None:
        """Fold in one decoded update (a delta or weights, as `target` says)."""

    @abstractmethod
    def finish(self) -> np.ndarray:
        """The new global model."""

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates folded in this round."""


class FedAvg(Strategy):
    """Weighted average of the updates, weighted by sample count (McMahan et al.).

    target="delta": new = global + server_lr * sum(w_i d_i) / sum(w_i)
    target="weights": new = sum(w_i x_i) / sum(w_i)
    Memory is O(model): one float64 accumulator.
    """

    def __init__(self, target: str = "delta", server_lr: float = 1.0) -> None:
        if target not in ("delta", "weights"):
            raise ValueError(f"unknown target {target!r}")
        self.target = target
        self.server_lr = server_lr
        self._global: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._weight = 0.0
        self._count = 0

    def begin(self, global_model: np.ndarray) -> None:
        self._global = global_model
        self._sum = np.zeros(global_model.shape, dtype=np.float64)
        self._weight = 0.0
        self._count = 0

    def accumulate(self, update: np.ndarray, weight: float) -> None:
        assert self._sum is not None, "begin() first"
        if weight <= 0:
            raise ValueError("weight must be positive")
        self._sum += weight * update.astype(np.float64, copy=False)
        self._weight += weight
        self._count += 1

    def finish(self) -> np.ndarray:
        assert self._global is not None and self._sum is not None
        if self._count == 0:
            return self._global
        mean = self._sum / self._weight
        if self.target == "weights":
            return mean.astype(np.float32)
        return (self._global.astype(np.float64) + self.server_lr * mean).astype(np.float32)

    @property
    def count(self) -> int:
        return self._count
