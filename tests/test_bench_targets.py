"""bench.fl_bench's targets: accuracy (higher is better) and perplexity (lower is better), per setting."""

from __future__ import annotations

import math

import pytest

from bench.fl_bench import ACCURACY, LM, PERPLEXITY, SETTINGS, Config, target_of, to_target


def run(values: list[float], metric: str) -> dict:
    key = (
        (lambda v: {"accuracy": v, "loss": 0.0})
        if metric == "accuracy"
        else (lambda v: {"accuracy": 0.0, "loss": math.log(v)})
    )
    return {
        "rounds": [{"round": i + 1, **key(v), "up_wire": 10, "down_wire": 20} for i, v in enumerate(values)]
    }


def test_an_accuracy_target_is_one_point_below_and_reached_from_below() -> None:
    ref, target = target_of([run([0.5, 0.7, 0.8], "accuracy")], Config(rounds=3, smooth=2), ACCURACY)
    assert ref == pytest.approx(0.75) and target == pytest.approx(0.74)
    hit = to_target(run([0.5, 0.745, 0.8], "accuracy"), target, ACCURACY)
    assert hit is not None and hit["rounds"] == 2 and hit["up"] == 20 and hit["down"] == 40


def test_a_perplexity_target_is_two_percent_above_and_reached_from_above() -> None:
    ref, target = target_of([run([30.0, 12.0, 10.0], "perplexity")], Config(rounds=3, smooth=2), PERPLEXITY)
    assert ref == pytest.approx(11.0) and target == pytest.approx(11.22)
    assert to_target(run([30.0, 11.5, 11.3], "perplexity"), target, PERPLEXITY) is None
    hit = to_target(run([30.0, 11.5, 11.2], "perplexity"), target, PERPLEXITY)
    assert hit is not None and hit["rounds"] == 3


def test_the_language_model_setting_keeps_its_protocol_under_explicit_flags() -> None:
    lm = next(s for s in SETTINGS if s.key == LM)
    cfg = lm.config(Config())
    assert (cfg.rounds, cfg.collaborators, cfg.per_round, cfg.seeds) == (30, 8, 4, [0])
    assert lm.config(Config(), {"rounds": 3}).rounds == 3
    assert lm.metric is PERPLEXITY and lm.training["optimizer"] == "adam"
    assert all(s.config(Config()) == Config() for s in SETTINGS if s.key != LM)


def test_converged_runs_of_other_settings_get_a_section_of_their_own() -> None:
    from bench.converged import section

    assert section("mnist1d-a0.5,digits-a0.5,mnist1d-cnn-a0.5")[0] == "converged"
    assert section("digits-a0.5")[0] == "converged"
    key, title = section("mnist1d-a0.1,mnist1d-cnn-a0.1")
    assert key == "converged-mnist1d-a0.1-mnist1d-cnn-a0.1" and title.endswith(
        ": mnist1d-a0.1, mnist1d-cnn-a0.1"
    )


def test_the_ae_ablation_is_matched_to_the_ae_bytes_per_message() -> None:
    from bench.ae_target import matched_fraction, sign_topk_bytes

    n = 66_442
    for fraction in (0.002, 0.01, 0.05):
        assert matched_fraction(sign_topk_bytes(fraction, n), n) == pytest.approx(fraction, rel=0.05)


def test_an_ae_row_counts_the_decoder_in_its_uplink_bytes() -> None:
    from bench.ae_target import FEDAVG, ae_chain, row

    setting = next(s for s in SETTINGS if s.key == "mnist1d-a0.5")
    run = {"prepass_bytes": {"up_wire": 0, "down_wire": 9_000, "decoder": 1_000},
           "rounds": [{"round": r, "accuracy": 0.1 * r, "up_wire": 100, "down_wire": 50} for r in (1, 2, 3)]}  # fmt: skip
    fedavg = {"rounds": 3, "up": 120_000, "down": 0, "decoder": 0}
    cells = row(setting, 0.25, ae_chain(0.01), run, fedavg).split(" | ")
    assert cells[6:11] == ["3", "1.3 kB", "1 kB", "9.15 kB", "92x"]  # 1,000 + 3 x 100 up; 9,000 + 3 x 50 down
    assert row(setting, 0.9, FEDAVG, run, None).count("not in 3") == 1
