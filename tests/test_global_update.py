"""`downlink.update_chain`: the aggregator compresses its own global update (server-side error feedback).

The global model then moves on few coordinates per round, and `residual | lattice | entropy` on
the downlink catches each collaborator up on exactly those, however many rounds it missed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsqueeze.aggregator.federation import Federation
from fedsqueeze.aggregator.global_update import GlobalUpdate
from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import Chain, Layout
from fedsqueeze.plan import Plan, PlanError

from .test_reliability import make_plan, run_federation

STEP = 0.0005


def test_global_update_moves_sparsely_and_delays_nothing() -> None:
    layout = Layout.of({"w": np.zeros((30, 20)), "b": np.zeros(30)})
    n = layout.numel
    update = GlobalUpdate(Chain.parse("ef | topk:0.02"))
    rng = np.random.default_rng(0)
    model = np.zeros(n, np.float32)
    proposed_total = np.zeros(n, np.float64)
    for _ in range(8):
        step = rng.standard_normal(n).astype(np.float32)
        proposed_total += step
        new = update.apply(model, model + step, layout)
        assert np.count_nonzero(new - model) <= math.ceil(0.02 * n)
        model = new
    # Applied plus remembered is everything proposed: error feedback delays, it does not drop.
    memory = update.state.stage(0)["memory"]
    assert np.allclose(model + memory, proposed_total, atol=1e-4)
    assert update.last_stats is not None and update.last_stats.nmse > 0


def test_without_a_chain_the_proposal_is_applied_as_is() -> None:
    layout = Layout.of({"v": np.zeros(10)})
    proposed = np.arange(10, dtype=np.float32)
    assert np.array_equal(GlobalUpdate(None).apply(np.zeros(10, np.float32), proposed, layout), proposed)


def test_plan_field_is_checked_and_hashed() -> None:
    plan = make_plan(
        downlink={"chain": "residual | lattice:0.001 | entropy", "update_chain": "ef | topk:0.01"}
    )
    assert (
        str(LinkChains.from_plan(plan).global_update)
        == 'ef:decay=1.0 | topk:fraction=0.01,count=null,scope="global",positions="rice"'
    )
    assert plan.sha256 != make_plan(downlink={"chain": "residual | lattice:0.001 | entropy"}).sha256
    assert LinkChains.from_plan(make_plan()).global_update is None
    with pytest.raises(PlanError, match="downlink.update_chain: unknown codec"):
        Plan.from_json({"downlink": {"update_chain": "topq"}})


def test_partial_participation_catch_up_keeps_every_collaborator_within_half_a_step() -> None:
    """4 collaborators, 2 per round: each one misses rounds, yet after every model it decodes its copy is
    the global model to within step / 2, its downlink state matches the aggregator's, and catch-up
    messages carry only what moved."""
    plan = make_plan(
        rounds=6,
        collaborators={"min": 4, "fraction": 0.5, "min_per_round": 2, "join_timeout_s": 30},
        uplink={"chain": "ef | topk:0.05 | quantize:8 | entropy"},
        downlink={"chain": f"residual | lattice:{STEP} | entropy", "update_chain": "ef | topk:0.02"},
    )
    fed = Federation(plan)
    seen: dict[str, list[np.ndarray]] = {}
    original = fed.links.encode_download

    def encode_and_remember(member_id, round_number, model):  # the global model each collaborator was sent
        seen.setdefault(member_id, []).append(model.copy())
        return original(member_id, round_number, model)

    fed.links.encode_download = encode_and_remember  # type: ignore[method-assign]
    sim = run_federation(fed, 4)
    rounds = fed.report.rounds
    assert len(rounds) == 6 and all(r.status == "ok" for r in rounds)
    for member, step in zip(sim.members, sim.steps, strict=True):
        receiver = step.states.down
        # both sides hold the same copy
        assert receiver.fingerprint() == fed.links.link(member.collaborator_id).down.fingerprint()
        copy = receiver.stage(0)["history"][-1]
        assert np.abs(copy.astype(np.float64) - seen[member.collaborator_id][-1]).max() <= STEP / 2 * 1.001
    later = [r for r in rounds[1:] if r.bytes["down_raw"]]
    # After the first full model, catch-ups carry a few per cent of the coordinates: far below 4 bytes each.
    assert sum(r.bytes["down_wire"] for r in later) < 0.15 * sum(r.bytes["down_raw"] for r in later)
    assert fed.report.summary()["final_accuracy"] > 0.5
    # what was not applied is delayed, not lost
    assert np.count_nonzero(fed.global_update.state.stage(0)["memory"]) > 0
