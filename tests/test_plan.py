import json

import pytest

from fedsqueeze.chains import LinkChains
from fedsqueeze.plan import Plan, PlanError


def test_default_plan_is_valid_and_round_trips() -> None:
    plan = Plan()
    plan.validate()
    again = Plan.from_text(json.dumps(plan.to_json()))
    assert again == plan
    assert again.sha256 == plan.sha256


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"roundz": 3}', "unknown field(s) ['roundz']"),
        ('{"rounds": "three"}', "rounds must be an integer"),
        ('{"rounds": 0}', "rounds must be in"),
        ('{"task": {"dataset": ""}}', "task.dataset must not be empty"),
        ('{"model": {"buffers": "sum"}}', "model.buffers must be one of"),
        ('{"uplink": {"chain": "nosuchcodec"}}', "unknown codec 'nosuchcodec'"),
        ('{"uplink": {"chain": "zstd:99"}}', "uplink.chain: zstd: level"),
        ('{"collaborators": {"fraction": 2}}', "fraction must be in"),
        ('{"downlink": {"target": "delta"}}', "downlink: unknown field(s) ['target']"),
    ],
)
def test_malformed_plans_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(PlanError) as info:
        Plan.from_text(text)
    assert message in str(info.value)


def test_missing_plan_file(tmp_path) -> None:
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(tmp_path / "nope.json")


@pytest.mark.parametrize("name", ["ae", "ae-paper", "fewest-bytes", "fewest-bytes-mnist1d-cnn", "slow-link"])
def test_bundled_plans_load_and_build_their_chains(name: str) -> None:
    from pathlib import Path

    import fedsqueeze

    plan = Plan.load(Path(fedsqueeze.__file__).parent / "plans" / f"{name}.json")
    assert Plan.from_json(plan.to_json()).sha256 == plan.sha256
    LinkChains.from_plan(plan)  # every codec named exists and its parameters are valid
    if name.startswith("fewest-bytes") or name == "slow-link":
        assert plan.aggregation.server_optimizer.name == "adam" and plan.downlink.prior == "initial"
