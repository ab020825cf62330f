"""Server optimizers: how the round's aggregate step moves the global model (plan `aggregation.server_optimizer`).

FedAvg applies the averaged update as it is (`sgd` with lr 1). Treating that average as a
pseudo-gradient and giving the aggregator its own optimizer (Reddi et al. 2021, "Adaptive Federated
Optimization"; Hsu et al. 2019, FedAvgM) lets the server average over rounds as well as over
collaborators. That matters under partial participation: each round sees 10 % of the collaborators,
so one round's average is noisy, and momentum or Adam's second moments smooth it across rounds.

- `sgd`:      step = lr * delta
- `momentum`: m = beta1 * m + delta;  step = lr * m                         (FedAvgM)
- `adam`:     m = beta1 * m + (1 - beta1) * delta;  v = beta2 * v + (1 - beta2) * delta^2;
              step = lr * m / (sqrt(v) + tau)                              (FedAdam, no bias correction)
- `yogi`:     as adam, but v -= (1 - beta2) * delta^2 * sign(v - delta^2)  (FedYogi: v grows more slowly)

`delta` is the strategy's proposal minus the current global model, so it works for either uplink
target. The state (m, v) is O(model), float64, and saved in the aggregator's checkpoint.
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedsqueeze.plan import SERVER_OPTIMIZERS, PlanError, ServerOptimizerSpec, check_spec

__all__ = ["SERVER_OPTIMIZERS", "ServerOptimizer", "ServerOptimizerError", "ServerOptimizerSpec"]


class ServerOptimizerError(ValueError):
    pass


class ServerOptimizer:
    def __init__(self, spec: ServerOptimizerSpec) -> None:
        try:
            check_spec(spec, "aggregation.server_optimizer")
        except PlanError as exc:
            raise ServerOptimizerError(str(exc)) from exc
        self.spec = spec
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def apply(self, current: np.ndarray, proposed: np.ndarray) -> np.ndarray:
        """The next global model from the current one and the strategy's proposal."""
        if self.spec.is_plain:
            return np.asarray(proposed, dtype=np.float32)
        s = self.spec
        delta = np.asarray(proposed, dtype=np.float64) - current
        if s.name == "sgd":
            return (current + s.lr * delta).astype(np.float32)
        if self.m is None or self.m.shape != delta.shape:
            self.m = np.zeros_like(delta)
            self.v = None if s.name == "momentum" else np.zeros_like(delta)
        if s.name == "momentum":
            self.m *= s.beta1
            self.m += delta
            return (current + s.lr * self.m).astype(np.float32)
        assert self.v is not None
        self.m *= s.beta1
        self.m += (1 - s.beta1) * delta
        sq = delta * delta
        if s.name == "adam":
            self.v *= s.beta2
            self.v += (1 - s.beta2) * sq
        else:  # yogi
            self.v -= (1 - s.beta2) * sq * np.sign(self.v - sq)
        return (current + s.lr * self.m / (np.sqrt(self.v) + s.tau)).astype(np.float32)

    # -- checkpoint state ------------------------------------------------------------------------
    def _needs(self) -> tuple[str, ...]:
        return {"sgd": (), "momentum": ("m",)}.get(self.spec.name, ("m", "v"))

    def state_bytes(self) -> bytes:
        """safetensors bytes of the moments (m; v for adam and yogi); empty before the first round."""
        if self.m is None:
            return b""
        tensors = {"m": self.m} if self.v is None else {"m": self.m, "v": self.v}
        return st_save(tensors)

    def load_state(self, blob: bytes, size: int) -> None:
        """Restore the moments saved by `state_bytes` for a model of `size` parameters."""
        self.m = self.v = None
        if not blob:
            return
        try:
            tensors = st_load(blob)
        except Exception as exc:  # safetensors raises its own error types
            raise ServerOptimizerError(f"server optimizer state is not valid safetensors: {exc}") from exc
        for name in self._needs():
            arr = tensors.get(name)
            if arr is None or arr.shape != (size,) or arr.dtype != np.float64:
                raise ServerOptimizerError(
                    f"server optimizer state: tensor {name} is missing or not float64[{size}]"
                )
        self.m, self.v = tensors.get("m"), tensors.get("v") if "v" in self._needs() else None
