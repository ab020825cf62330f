"""`lattice`: the half-step bound, the dead zone, catch-up behind `residual`, hostile headers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import ArraySpec, Chain, CodecError, CodecState, Layout
from fedsqueeze.codecs.base import encode_varint
from fedsqueeze.codecs.lattice import Lattice
from fedsqueeze.codecs.positions import encode_positions

LAYOUT = Layout.of({"w": np.zeros((40, 25)), "b": np.zeros(40)})
N = LAYOUT.numel


def round_trip(chain: str, x: np.ndarray, layout: Layout = LAYOUT) -> tuple[np.ndarray, int]:
    p = Chain.parse(chain)
    enc = p.encode(x, layout, CodecState())
    out = p.decode(enc.data, layout, CodecState())
    assert np.array_equal(out, enc.reconstruction)
    return out, len(enc.data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 500),
    step=st.floats(1e-6, 10.0),
    levels=st.integers(1, 32767),
    spread=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_error_at_most_half_a_step_inside_the_range_and_clipped_outside(
    n: int, step: float, levels: int, spread: float, seed: int
) -> None:
    x = (np.random.default_rng(seed).standard_normal(n) * spread * step).astype(np.float32)
    layout = Layout.of({"v": x})
    out, _ = round_trip(f"lattice:step={step!r},levels={levels}", x, layout)
    s32 = float(np.float32(step))
    inside = np.abs(x) <= (levels + 0.5) * s32
    err = np.abs(out.astype(np.float64) - x)
    assert np.all(err[inside] <= s32 / 2 * (1 + 1e-6) + 1e-7 * np.abs(x[inside]))
    # Outside the range the level saturates at +-levels.
    assert np.allclose(np.abs(out[~inside]), levels * s32, rtol=1e-6)
    assert np.all(np.sign(out[~inside]) == np.sign(x[~inside]))
    # Every output is an integer multiple of the step.
    q = out.astype(np.float64) / s32
    assert np.allclose(q, np.rint(q), atol=1e-3)


def test_dead_zone_entries_are_not_sent() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(N) * 0.001).astype(np.float32)  # all below half a step of 0.01
    big = rng.choice(N, 20, replace=False)
    x[big] = rng.choice([-1.0, 1.0], 20) * rng.uniform(0.05, 0.5, 20)
    out, size = round_trip("lattice:0.01 | entropy", x)
    assert set(np.flatnonzero(out)) == set(big)
    assert size < 20 * 4  # 20 positions among 1,040 and their levels: far below 20 float32 values


def test_catch_up_behind_residual_never_drifts_and_sends_only_changes() -> None:
    """A model that moves sparsely each round; a receiver that syncs only every 7th round.

    The receiver's copy stays within step/2 of the model on every coordinate, for 120 rounds,
    and each catch-up message costs about the coordinates that moved since the last one."""
    rng = np.random.default_rng(1)
    step = 2.0**-10
    model = (rng.standard_normal(N) * 0.1).astype(np.float32)
    p = Chain.parse(f"residual | lattice:{step} | entropy")
    sender, receiver = CodecState(), CodecState()
    moved: set[int] = set(range(N))  # the first message carries everything
    sizes = []
    for t in range(120):
        if t % 7 == 0:
            enc = p.encode(model, LAYOUT, sender)
            copy = p.decode(enc.data, LAYOUT, receiver)
            assert np.abs(copy.astype(np.float64) - model).max() <= step / 2 * (1 + 1e-3)
            assert sender.fingerprint() == receiver.fingerprint()
            if t:
                sizes.append((len(enc.data), len(moved)))
            moved = set()
        idx = rng.choice(N, 10, replace=False)  # the model moves on 10 coordinates per round
        model[idx] += (rng.standard_normal(10) * 0.02).astype(np.float32)
        moved |= set(idx.tolist())
    for size, changed in sizes:
        assert size <= 3 * changed + 16  # ~log2(N/k) + level bits per changed coordinate


def test_quantizing_a_lattice_sum_is_lossless() -> None:
    """Values already on the grid (sums of earlier lattice outputs) decode exactly."""
    step = 2.0**-12
    levels = np.random.default_rng(2).integers(-300, 300, N)
    x = (levels * step).astype(np.float32)
    out, _ = round_trip(f"lattice:{step}", x)
    assert np.array_equal(out, x)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "0.1", 1e31])
def test_bad_step_refused(bad: object) -> None:
    with pytest.raises(CodecError, match="step"):
        Lattice(step=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3, 32768, 1.5, True])
def test_bad_levels_refused(bad: object) -> None:
    with pytest.raises(CodecError, match="levels"):
        Lattice(levels=bad)  # type: ignore[arg-type]


def test_hostile_headers_and_levels_refused() -> None:
    spec = ArraySpec(np.float32, 100)
    codec = Lattice(step=0.1, levels=7)
    with pytest.raises(CodecError, match="kept entries out of"):
        codec.output_spec(spec, encode_varint(101))
    side = encode_varint(3) + encode_positions(np.array([1, 5, 9]), 100)
    out_spec = codec.output_spec(spec, side)
    assert out_spec.count == 3 and out_spec.symbols == (-7, 7)
    with pytest.raises(CodecError, match="outside"):
        out_spec.check(np.array([1, 8, -2], dtype=np.int16), "levels")
    # output_spec reads the count only; decode reads (and checks) the positions.
    with pytest.raises(CodecError):
        codec.decode(side[:-1], np.array([1, 1, 1], dtype=np.int16), spec, {})
