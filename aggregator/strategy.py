"""Aggregation strategies. FedAvg streams: a running weighted sum, never a list of updates.

Every strategy can clip each update's L2 norm first (`clip_norm`, absolute); for target="weights"
the norm is that of (update - global), the implied delta. The robust strategies (coordinate-wise
median, trimmed mean) need every update of a round at once: O(participants x model) memory.

FedAvg also bounds the one update that would move the model most (`norm_ratio`, plan
`aggregation.norm_bound`): it holds aside the update of largest influence (weight x delta norm),
folding every other one in as it arrives, and at the end scales the held one's delta to at most
`norm_ratio` times the median delta norm of the round's other updates (or, alone in its round,
of the last rounds' updates). One wild update (a delta x 1e6) then moves the model no further than
a few honest ones; honest rounds, whose norms differ by far less, are left as they are. The held
update costs one more model of memory. `bounded` says what happened, for the round's record.
"""

from __future__ import annotations

import math
import statistics
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np


class Strategy(ABC):
    """Combines the updates of one round into the next global model."""

    clip_norm: float | None = None
    target: str = "delta"
    clipped: int = 0  # updates clipped this round

    def _delta(self, update: np.ndarray, global_model: np.ndarray) -> np.ndarray:
        u = update.astype(np.float64, copy=False)
        return u if self.target == "delta" else u - global_model

    def _clip(self, update: np.ndarray, global_model: np.ndarray) -> np.ndarray:
        """The update with its delta's L2 norm clipped to `clip_norm` (float64)."""
        u = update.astype(np.float64, copy=False)
        if self.clip_norm is None:
            return u
        delta = self._delta(u, global_model)
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

    def summary(self) -> dict[str, Any]:
        """What the strategy did beyond averaging this round (for the round's record); empty: nothing."""
        return {"clipped": self.clipped} if self.clipped else {}


@dataclass
class _Held:
    update: np.ndarray  # float64, already clipped
    weight: float
    norm: float  # of its delta

    @property
    def influence(self) -> float:
        return self.weight * self.norm


class FedAvg(Strategy):
    """Weighted average of the updates, weighted by sample count (McMahan et al.).

    target="delta": new = global + server_lr * sum(w_i d_i) / sum(w_i)
    target="weights": new = sum(w_i x_i) / sum(w_i)
    Memory is O(model): one float64 accumulator, and the held-aside update of largest influence.
    """

    def __init__(
        self,
        target: str = "delta",
        server_lr: float = 1.0,
        clip_norm: float | None = None,
        norm_ratio: float | None = None,
        recent_norms: list[float] | None = None,
    ) -> None:
        if target not in ("delta", "weights"):
            raise ValueError(f"unknown target {target!r}")
        self.target = target
        self.server_lr = server_lr
        self.clip_norm = clip_norm
        self.norm_ratio = norm_ratio
        self.recent_norms = list(recent_norms or [])  # delta norms of the last rounds' accepted updates
        self.norms: list[float] = []  # this round's delta norms, in arrival order (after clip_norm)
        self.bounded: dict[str, float] | None = None
        self._global: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._weight = 0.0
        self._count = 0
        self._held: _Held | None = None

    def begin(self, global_model: np.ndarray) -> None:
        self._global = global_model
        self._sum = np.zeros(global_model.shape, dtype=np.float64)
        self._weight = 0.0
        self._count = 0
        self._held = None
        self.norms = []
        self.bounded = None
        self.clipped = 0

    def accumulate(self, update: np.ndarray, weight: float) -> None:
        assert self._sum is not None and self._global is not None, "begin() first"
        if weight <= 0:
            raise ValueError("weight must be positive")
        u = self._clip(update, self._global)
        norm = float(np.linalg.norm(self._delta(u, self._global)))
        self.norms.append(norm)
        self._count += 1
        arriving: _Held | None = _Held(u.copy() if u is update else u, weight, norm)
        assert arriving is not None
        if self.norm_ratio and (self._held is None or arriving.influence > self._held.influence):
            # keep the most influential aside, fold in the one it displaces
            arriving, self._held = (
                self._held,
                arriving,
            )
        if arriving is not None:
            self._fold(arriving.update, arriving.weight)

    def _fold(self, update: np.ndarray, weight: float) -> None:
        assert self._sum is not None
        self._sum += weight * update
        self._weight += weight

    def _release_held(self) -> None:
        """Fold in the held update, its delta scaled to at most norm_ratio x the median of the others' norms."""
        held, self._held = self._held, None
        if held is None:
            return
        assert self._global is not None and self.norm_ratio
        others = list(self.norms)
        others.remove(held.norm)
        reference = others or self.recent_norms
        update = held.update
        if reference and held.norm > 0:
            limit = self.norm_ratio * statistics.median(reference)
            if held.norm > limit:
                self.bounded = {"norm": held.norm, "to": limit}
                delta = self._delta(update, self._global) * (limit / held.norm)
                update = delta if self.target == "delta" else self._global + delta
        self._fold(update, held.weight)

    def finish(self) -> np.ndarray:
        assert self._global is not None and self._sum is not None
        self._release_held()
        if self._count == 0:
            return self._global
        mean = self._sum / self._weight
        if self.target == "weights":
            return mean.astype(np.float32)
        return (self._global.astype(np.float64) + self.server_lr * mean).astype(np.float32)

    @property
    def count(self) -> int:
        return self._count

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        if self.bounded is not None:
            out["norm_bounded"] = {k: round(v, 6) for k, v in self.bounded.items()}
        return out


class _Buffered(Strategy):
    """Keeps every (clipped) update of the round: O(participants x model) memory."""

    def __init__(self, target: str = "delta", clip_norm: float | None = None) -> None:
        if target not in ("delta", "weights"):
            raise ValueError(f"unknown target {target!r}")
        self.target = target
        self.clip_norm = clip_norm
        self._global: np.ndarray | None = None
        self._updates: list[np.ndarray] = []
        self.norms: list[float] = []

    def begin(self, global_model: np.ndarray) -> None:
        self._global = global_model
        self._updates = []
        self.norms = []
        self.clipped = 0

    def accumulate(self, update: np.ndarray, weight: float) -> None:  # robust rules ignore the weights
        assert self._global is not None, "begin() first"
        if weight <= 0:
            raise ValueError("weight must be positive")
        u = self._clip(update, self._global)
        self.norms.append(float(np.linalg.norm(self._delta(u, self._global))))
        self._updates.append(u.astype(np.float32))

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
    values, average the rest (unweighted). Memory: O(participants x model).

    With too few updates for `trim_fraction` to cut any (k = floor(trim_fraction x n) = 0, as with
    the default 0.1 and fewer than 10 updates) it is a plain mean: `summary` says so ("trimmed": 0)."""

    def __init__(
        self, target: str = "delta", clip_norm: float | None = None, trim_fraction: float = 0.1
    ) -> None:
        super().__init__(target, clip_norm)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        self.trim_fraction = trim_fraction
        self.trimmed: int | None = None

    def trim_count(self, n: int) -> int:
        return min(math.floor(self.trim_fraction * n), (n - 1) // 2)

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        n = stacked.shape[0]
        k = self.trimmed = self.trim_count(n)
        if k == 0:
            return stacked.mean(axis=0, dtype=np.float64)
        part = np.sort(stacked, axis=0)[k : n - k]
        return part.mean(axis=0, dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        if self.trimmed is not None:
            out["trimmed_per_side"] = self.trimmed
        return out


def build_strategy(
    target: str,
    clip_norm: float | None = None,
    robust: str | None = None,
    trim_fraction: float = 0.1,
    norm_ratio: float | None = None,
    recent_norms: list[float] | None = None,
) -> Strategy:
    """The plan's `aggregation` section as a Strategy."""
    if robust is None:
        return FedAvg(target=target, clip_norm=clip_norm, norm_ratio=norm_ratio, recent_norms=recent_norms)
    if robust == "median":
        return CoordinateMedian(target=target, clip_norm=clip_norm)
    if robust == "trimmed_mean":
        return TrimmedMean(target=target, clip_norm=clip_norm, trim_fraction=trim_fraction)
    raise ValueError(f"unknown robust aggregator {robust!r}")
