"""`aggregation.server_optimizer` (FedAvgM, FedAdam, FedYogi) and `downlink.prior: "initial"`."""

from __future__ import annotations

import numpy as np
import pytest

from fedsqueeze.aggregator.federation import Federation
from fedsqueeze.aggregator.server_optimizer import ServerOptimizer, ServerOptimizerError
from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import Chain, CodecError, CodecState, Layout
from fedsqueeze.plan import Plan, PlanError, ServerOptimizerSpec

from .test_reliability import make_plan, run_federation

RNG = np.random.default_rng(0)


def _steps(n: int = 3, size: int = 50) -> list[np.ndarray]:
    return [RNG.standard_normal(size) for _ in range(n)]


def test_plain_sgd_applies_the_proposal_unchanged() -> None:
    opt = ServerOptimizer(ServerOptimizerSpec())
    current, proposed = np.zeros(5, np.float32), np.arange(5, dtype=np.float32)
    assert np.array_equal(opt.apply(current, proposed), proposed)
    assert opt.state_bytes() == b""
    half = ServerOptimizer(ServerOptimizerSpec(lr=0.5)).apply(current, proposed)
    assert np.allclose(half, proposed / 2)


def test_momentum_adam_and_yogi_follow_their_update_rules() -> None:
    deltas = _steps()
    for name in ("momentum", "adam", "yogi"):
        spec = ServerOptimizerSpec(name=name, lr=0.1, beta1=0.8, beta2=0.9, tau=0.01)
        opt = ServerOptimizer(spec)
        model = np.zeros(50, np.float64)
        m, v = np.zeros(50), np.zeros(50)
        for d in deltas:
            new = opt.apply(model.astype(np.float32), (model + d).astype(np.float32))
            d32 = (model + d).astype(np.float32).astype(np.float64) - model.astype(np.float32)
            if name == "momentum":
                m = 0.8 * m + d32
                expected = model + 0.1 * m
            else:
                m = 0.8 * m + 0.2 * d32
                v = 0.9 * v + 0.1 * d32**2 if name == "adam" else v - 0.1 * d32**2 * np.sign(v - d32**2)
                expected = model + 0.1 * m / (np.sqrt(v) + 0.01)
            assert np.allclose(new, expected, atol=1e-5), name
            model = new.astype(np.float64)


def test_adam_steps_scale_with_lr_not_with_the_update() -> None:
    opt = ServerOptimizer(ServerOptimizerSpec(name="adam", lr=0.01))
    model = np.zeros(1000, np.float32)
    first = True
    for d in _steps(5, 1000):
        new = opt.apply(model, model + 100 * d.astype(np.float32))
        step = np.abs(new - model)
        if first:  # m / (sqrt(v) + tau) is just under 1 on the first round, however large the update
            assert step.max() <= 0.01 and np.median(step) > 0.0099
            first = False
        assert step.max() <= 10 * 0.01
        model = new


def test_state_round_trips_and_bad_state_is_refused() -> None:
    spec = ServerOptimizerSpec(name="adam", lr=0.05)
    a, b = ServerOptimizer(spec), ServerOptimizer(spec)
    model = np.zeros(50, np.float32)
    steps = _steps(4)
    for d in steps[:2]:
        model = a.apply(model, model + d.astype(np.float32))
    b.load_state(a.state_bytes(), 50)
    for d in steps[2:]:
        proposed = model + d.astype(np.float32)
        out_a, out_b = a.apply(model, proposed), b.apply(model, proposed)
        assert np.array_equal(out_a, out_b)
        model = out_a
    with pytest.raises(ServerOptimizerError, match="not valid safetensors"):
        b.load_state(b"garbage", 50)
    with pytest.raises(ServerOptimizerError, match=r"tensor m is missing or not float64\[60\]"):
        b.load_state(a.state_bytes(), 60)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"name": "lion"}, "server_optimizer.name must be one of"),
        ({"lr": 0}, "server_optimizer.lr must be > 0"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"beta2": 0}, r"beta2 must be in \(0, 1\)"),
        ({"tau": -1}, "tau must be > 0"),
        ({"momentum": 0.9}, r"unknown field\(s\) \['momentum'\]"),
    ],
)
def test_plan_names_a_bad_server_optimizer(section: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Plan.from_json({"aggregation": {"server_optimizer": section}})


def test_federation_with_fedadam_learns_faster_than_fedavg_and_reports_it() -> None:
    feds = {}
    for name, lr in (("sgd", 1.0), ("adam", 0.05)):
        feds[name] = Federation(
            make_plan(rounds=5, aggregation={"server_optimizer": {"name": name, "lr": lr}})
        )
        run_federation(feds[name], 2)
    adam = feds["adam"]
    assert adam.report.header["server_optimizer"]["name"] == "adam"
    assert adam.server_optimizer.m is not None and adam.server_optimizer.v is not None
    start = adam.report.extra["initial_accuracy"]
    final = {k: f.report.rounds[-1].accuracy for k, f in feds.items()}
    assert final["adam"] > start + 0.2 and final["adam"] > final["sgd"]


# -- downlink.prior ---------------------------------------------------------------------------------
def test_prior_makes_the_first_download_a_change_not_the_whole_model() -> None:
    layout = Layout.of({"w": np.zeros((40, 25))})
    initial = RNG.standard_normal(layout.numel).astype(np.float32)
    current = initial + 0.001 * RNG.standard_normal(layout.numel).astype(np.float32)
    chain = Chain.parse("residual | topk:0.05 | quantize:8 | entropy")
    plain = chain.encode(current, layout, CodecState())
    chains = LinkChains.from_plan(make_plan(downlink={"chain": str(chain), "prior": "initial"}))
    sender, receiver = chains.downlink_state(initial), chains.downlink_state(initial)
    primed = chain.encode(current, layout, sender)
    got = chain.decode(primed.data, layout, receiver)
    # Same size (top-k 5 %), but now it is the change since round 0 that is cut, not the weights.
    assert np.abs(got - current).max() < 0.005 < np.abs(plain.reconstruction - current).max()
    assert sender.fingerprint() == receiver.fingerprint()


def test_prior_mismatch_is_refused_naming_the_cause() -> None:
    layout = Layout.of({"w": np.zeros(100)})
    chain = Chain.parse("residual | fp16")
    chains = LinkChains.from_plan(make_plan(downlink={"chain": "residual | fp16", "prior": "initial"}))
    initial = np.ones(100, np.float32)
    encoded = chain.encode(initial * 1.1, layout, chains.downlink_state(initial))
    with pytest.raises(CodecError, match="predictor out of sync.*downlink.prior is 'initial'"):
        chain.decode(encoded.data, layout, chains.downlink_state(initial * 2))


def test_prior_needs_a_residual_chain() -> None:
    with pytest.raises(PlanError, match="needs a downlink chain that starts with 'residual', got 'topk:"):
        Plan.from_json({"downlink": {"chain": "topk:0.1", "prior": "initial"}})
    with pytest.raises(PlanError, match="downlink.prior must be one of \\['none', 'initial'\\]"):
        Plan.from_json({"downlink": {"prior": "zeros"}})
    assert Plan.from_json({}).downlink.prior == "none"


def test_fedadam_with_a_sparse_uplink_and_a_dense_catch_up_downlink_learns_on_few_bytes() -> None:
    """The benchmark's G rows in small: STC up, FedAdam, a coarse lattice catch-up down from the prior."""
    plan = make_plan(rounds=6, uplink={"chain": "ef | stc:0.01 | entropy"},
                     downlink={"chain": "residual | lattice:0.03 | entropy", "prior": "initial"},
                     aggregation={"server_optimizer": {"name": "adam", "lr": 0.03}})  # fmt: skip
    fed = Federation(plan)
    run_federation(fed, 2)
    rounds = fed.report.rounds
    assert len(rounds) == 6 and rounds[-1].accuracy > fed.report.extra["initial_accuracy"] + 0.2
    # Measured: ~300x up; down ~150x (round 1's download is 36 B: the model is still the prior).
    assert sum(r.bytes["up_wire"] for r in rounds) * 150 < sum(r.bytes["up_raw"] for r in rounds)
    assert sum(r.bytes["down_wire"] for r in rounds[1:]) * 30 < sum(r.bytes["down_raw"] for r in rounds[1:])


def test_the_fewest_bytes_recipe_with_context_coded_positions_learns() -> None:
    """fedsqueeze/plans/fewest-bytes.json's chains: positions coded with contexts both ways, through the Federation."""
    import json
    from pathlib import Path

    import fedsqueeze

    recipe = json.loads((Path(fedsqueeze.__file__).parent / "plans" / "fewest-bytes.json").read_text())
    assert (
        "positions=context" in recipe["uplink"]["chain"]
        and "positions=context" in recipe["downlink"]["chain"]
    )
    plan = make_plan(
        rounds=6, uplink=recipe["uplink"], downlink=recipe["downlink"], aggregation=recipe["aggregation"]
    )
    fed = Federation(plan)
    run_federation(fed, 2)
    rounds = fed.report.rounds
    assert len(rounds) == 6 and rounds[-1].accuracy > fed.report.extra["initial_accuracy"] + 0.2
    up_ratio = sum(r.bytes["up_raw"] for r in rounds) / sum(r.bytes["up_wire"] for r in rounds)
    down_ratio = sum(r.bytes["down_raw"] for r in rounds[1:]) / sum(r.bytes["down_wire"] for r in rounds[1:])
    assert up_ratio > 300 and down_ratio > 100  # measured: 548x up, 322x down
