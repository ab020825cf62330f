"""Aggregation strategies. FedAvg streams: a running weighted sum, never a list of updates.

The robust strategies (coordinate-wise median, trimmed mean) need every update of a round at
once: O(participants x model) memory. Every strategy can clip each update's L2 norm first
(`clip_norm`); for target="weights" the norm is that of (update - global), the implied delta.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np


class Strategy(ABC):
    """Combines the updates of one round into the next global model."""

    clip_norm: float | None = None
    target: str = "delta"
    clipped: int = 0  # updates clipped this round

    def _clip(self, update: np.ndarray, global_model: np.ndarray) -> np.ndarray:
        """The update with its delta's L2 norm clipped to `clip_norm` (float64)."""
        u = update.astype(np.float64, copy=False)
        if self.clip_norm is None:
            return u
        delta = u if self.target == "delta" else u - global_model
        norm = float(np.linalg.norm(delta))
        if not math.isfinite(norm) or norm <= self.clip_norm:
            return u
        self.clipped += 1
        delta = delta * (self.clip_norm / norm)
        return delta if self.target == "delta" else global_model + delta

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

    def __init__(self, target: str = "delta", server_lr: float = 1.0, clip_norm: float | None = None) -> None:
        if target not in ("delta", "weights"):
            raise ValueError(f"unknown target {target!r}")
        self.target = target
        self.server_lr = server_lr
        self.clip_norm = clip_norm
        self._global: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._weight = 0.0
        self._count = 0

    def begin(self, global_model: np.ndarray) -> None:
        self._global = global_model
        self._sum = np.zeros(global_model.shape, dtype=np.float64)
        self._weight = 0.0
        self._count = 0
        self.clipped = 0

    def accumulate(self, update: np.ndarray, weight: float) -> None:
        assert self._sum is not None and self._global is not None, "begin() first"
        if weight <= 0:
            raise ValueError("weight must be positive")
        self._sum += weight * self._clip(update, self._global)
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


class _Buffered(Strategy):
    """Keeps every (clipped) update of the round: O(participants x model) memory."""

    def __init__(self, target: str = "delta", clip_norm: float | None = None) -> None:
        if target not in ("delta", "weights"):
            raise ValueError(f"unknown target {target!r}")
        self.target = target
        self.clip_norm = clip_norm
        self._global: np.ndarray | None = None
        self._updates: list[np.ndarray] = []

    def begin(self, global_model: np.ndarray) -> None:
        self._global = global_model
        self._updates = []
        self.clipped = 0

    def accumulate(self, update: np.ndarray, weight: float) -> None:  # robust rules ignore the weights
        assert self._global is not None, "begin() first"
        if weight <= 0:
            raise ValueError("weight must be positive")
        self._updates.append(self._clip(update, self._global).astype(np.float32))

    @abstractmethod
    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        """Coordinate-wise combination of an (n, d) stack."""

    def finish(self) -> np.ndarray:
        assert self._global is not None
        if not self._updates:
            return self._global
        combined = self._combine(np.stack(self._updates)).astype(np.float64)
        self._updates = []
        if self.target == "weights":
            return combined.astype(np.float32)
        return (self._global.astype(np.float64) + combined).astype(np.float32)

    @property
    def count(self) -> int:
        return len(self._updates)


class CoordinateMedian(_Buffered):
    """Coordinate-wise median of the updates (Yin et al. 2018), unweighted.

    Tolerates fewer than half of the updates being arbitrary. Memory: O(participants x model),
    every update of the round is kept until `finish`.
    """

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)


class TrimmedMean(_Buffered):
    """Coordinate-wise trimmed mean: per coordinate, drop the `trim_fraction` largest and smallest
    values, average the rest (unweighted). Memory: O(participants x model)."""

    def __init__(self, target: str = "delta", clip_norm: float | None = None, trim_fraction: float = 0.1) -> None:
        super().__init__(target, clip_norm)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        self.trim_fraction = trim_fraction

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        n = stacked.shape[0]
        k = min(int(np.floor(self.trim_fraction * n)), (n - 1) // 2)
        if k == 0:
            return stacked.mean(axis=0, dtype=np.float64)
        part = np.sort(stacked, axis=0)[k : n - k]
        return part.mean(axis=0, dtype=np.float64)


def build_strategy(target: str, clip_norm: float | None = None, robust: str | None = None, trim_fraction: float = 0.1) -> Strategy:
    """The plan's `aggregation` section as a Strategy."""
    if robust is None:
        return FedAvg(target=target, clip_norm=clip_norm)
    if robust == "median":
        return CoordinateMedian(target=target, clip_norm=clip_norm)
    if robust == "trimmed_mean":
        return TrimmedMean(target=target, clip_norm=clip_norm, trim_fraction=trim_fraction)
    raise ValueError(f"unknown robust aggregator {robust!r}")
