"""The plan's codec chains as objects, built once per process by both sides of every link."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsqueeze.codecs import Chain, CodecState
from fedsqueeze.plan import Plan


@dataclass(frozen=True)
class LinkChains:
    uplink: Chain  # collaborator -> aggregator (with an `ae` stage's settings from the plan's prepass)
    downlink: Chain  # aggregator -> collaborator
    # the aggregator's own chain for each round's global update (downlink.update_chain)
    global_update: Chain | None
    prior_initial: bool  # downlink.prior "initial": both sides prime the downlink with the initial model

    @classmethod
    def from_plan(cls, plan: Plan) -> LinkChains:
        update = plan.downlink.update_chain
        return cls(
            uplink=Chain.from_config(plan.uplink_chain_config),
            downlink=Chain.from_config(plan.downlink.chain),
            global_update=None if update is None else Chain.from_config(update),
            prior_initial=plan.downlink.prior == "initial",
        )

    def downlink_state(self, initial_model: np.ndarray | None) -> CodecState:
        """A new downlink CodecState for one collaborator (either side), primed when `downlink.prior` is "initial"."""
        state = CodecState()
        if self.prior_initial:
            if initial_model is None:
                raise ValueError("downlink.prior is 'initial' but no initial model was given")
            self.downlink.prime(state, initial_model)
        return state
