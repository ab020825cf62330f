"""Server-side compression of the global update (plan `downlink.update_chain`).

Without it the global model moves by the full aggregate every round, so every coordinate
changes, and a collaborator that comes back after missing rounds needs all of them again: a
sparse per-collaborator downlink (`residual | topk | ...`) then leaves it training on a stale
model, which is why sparse downlinks failed under 10 % participation (docs/benchmarks.md).

With it, the aggregator passes each round's update (new global - old global) through its own
codec chain, with its own CodecState, and applies only what that chain reconstructs
(DoubleSqueeze, Tang et al. 2019; STC's server side, Sattler et al. 2019). With `ef` in front,
nothing is lost, only delayed: the part not applied stays in the aggregator's error-feedback
memory and is applied in a later round. The model then moves on few coordinates per round, and
a downlink such as `residual | lattice:0.0005 | entropy` sends each collaborator exactly the
coordinates that moved since it last synchronised, however many rounds it missed.

The encoded message itself is not sent: only its reconstruction matters. Its state is saved with
the aggregator's checkpoint.
"""

from __future__ import annotations

import numpy as np

from fedsqueeze.codecs import Chain, CodecState, EncodeStats, Layout


class GlobalUpdate:
    def __init__(self, chain: Chain | None) -> None:
        self.chain = chain
        self.state = CodecState()  # the aggregator's own: error-feedback memory of the global update
        self.last_stats: EncodeStats | None = None

    def apply(self, current: np.ndarray, proposed: np.ndarray, layout: Layout) -> np.ndarray:
        """The next global model: `proposed` itself, or `current` plus the chain's reconstruction of the step."""
        proposed = np.asarray(proposed, dtype=np.float32)
        if self.chain is None:
            return proposed
        encoded = self.chain.encode(proposed - current, layout, self.state)
        self.last_stats = encoded.stats
        return (current + encoded.reconstruction).astype(np.float32)
