"""Quantization-aware training (seed 003 section IV-B): local training through the message's quantizer.

Every forward and backward pass runs on the weights as a stateless codec chain reconstructs them
(`training.qat`, e.g. `sign` or `quantize:4,granularity=layer,grid=minmax`); the optimizer steps the
float weights behind them with those gradients (the straight-through estimator of BinaryConnect,
Courbariaux et al. 2015). After the last step the model holds its quantized weights, so an uplink
with the same quantizer (`uplink.target: "weights"`) sends exactly what was trained.

`sign` is BinaryConnect with one scale per layer, mean |w| (the least-squares scale of a sign
vector), so a binary layer keeps its magnitude; `quantize:b,granularity=layer` is b-bit
fake quantization with a grid per layer, as Brevitas' default per-layer scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedsqueeze.codecs import Chain, Layout

if TYPE_CHECKING:  # torch only where training runs: the aggregator validates plans without it
    import torch
    from torch import nn


def qat_chain(config: str) -> Chain | None:
    """The chain of `training.qat`, or None when QAT is off. It must be stateless: it shapes weights, not a stream."""
    return Chain.parse_stateless(
        config, "QAT chain", "a quantizer must map the same weights to the same values"
    )


@dataclass
class WeightQuantizer:
    """Puts a model's weights onto the chain's grid and takes its float weights back."""

    model: nn.Module
    chain: Chain
    layout: Layout
    tensors: dict[str, torch.Tensor]  # the travelling tensors, found once: not the state_dict every step

    @classmethod
    def of(cls, model: nn.Module, chain: Chain) -> WeightQuantizer:
        from fedsqueeze.model_state import layout_of, travelling

        tensors = travelling(model)
        return cls(model, chain, layout_of(tensors), tensors)

    def quantize(self) -> None:
        """The model's travelling tensors, replaced by what the chain reconstructs of them."""
        from fedsqueeze.model_state import load_vector, to_vector

        encoded = self.chain.encode(to_vector(self.tensors), self.layout)
        load_vector(self.tensors, encoded.reconstruction, self.model)

    def swap_in(self) -> list[torch.Tensor]:
        """Quantize, returning the float parameters to `restore` before the optimizer's step."""
        latent = [p.detach().clone() for p in self.model.parameters()]
        self.quantize()
        return latent

    def restore(self, latent: list[torch.Tensor]) -> None:
        """The float parameters back under the gradients of the quantized ones (buffers keep their updates)."""
        import torch

        with torch.no_grad():
            for p, saved in zip(self.model.parameters(), latent, strict=True):
                p.copy_(saved)
