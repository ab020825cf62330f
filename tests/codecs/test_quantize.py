"""`quantize`: the half-step bound per granularity and grid, MSE clipping, NMSE below 1 on heavy tails, stochastic
rounding, headers, hostile input, golden."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsqueeze.codecs import ArraySpec, Chain, CodecError, CodecState, Layout
from fedsqueeze.codecs.base import encode_varint
from fedsqueeze.codecs.quantize import Quantize

LAYOUT = Layout.of({"conv": np.zeros((6, 3, 3, 3)), "fc": np.zeros((10, 24)), "bias": np.zeros(10)})
N = LAYOUT.numel
SMALL = Layout.of({"w": np.zeros((4, 6)), "b": np.zeros(4)})
GOLDEN = Path(__file__).parent / "golden"
U = 2.0**-22  # the documented float32 term, relative to the group's largest magnitude


def vec(seed: int = 0, n: int = N, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def round_trip(chain: str, x: np.ndarray, layout: Layout = LAYOUT) -> tuple[np.ndarray, bytes]:
    p = Chain.parse(chain)
    enc = p.encode(x, layout, CodecState())
    out = p.decode(enc.data, layout, CodecState())
    assert np.array_equal(out, enc.reconstruction)
    assert out.dtype == np.float32 and out.shape == (layout.numel,)
    return out, enc.data


def groups(layout: Layout | None, n: int, granularity: str) -> list[slice]:
    """Reference grouping, written independently of the codec."""
    if granularity == "tensor" or layout is None:
        return [slice(0, n)]
    out = []
    for t, sl in layout.slices():
        if t.numel == 0:
            continue
        if granularity == "channel" and len(t.shape) >= 2:
            per = t.numel // t.shape[0]
            out += [slice(a, a + per) for a in range(sl.start, sl.stop, per)]
        else:
            out.append(sl)
    return out


def assert_within_bound(
    x: np.ndarray, out: np.ndarray, bits: int, grs: list[slice], factor: float = 0.5
) -> None:
    levels = (1 << bits) - 1
    for g in grs:
        xs, os_ = x[g].astype(np.float64), out[g].astype(np.float64)
        if xs.size == 0:
            continue
        step = (xs.max() - xs.min()) / levels
        step32 = float(np.nextafter(np.float32(step), np.float32(np.inf)))  # rounded up: at most one ulp more
        bound = factor * step32 + U * np.abs(xs).max() + 2.0**-149
        assert np.abs(xs - os_).max() <= bound, (g, np.abs(xs - os_).max(), bound)


def zero_grid_step(xs: np.ndarray, bits: int) -> float:
    """The zero grid's step magnitude without clipping, written independently: the long side gets z + 1 levels."""
    z = (1 << (bits - 1)) - 1
    hi, lo = max(float(xs.max()), 0.0), max(-float(xs.min()), 0.0)
    step = max(hi, lo) / (z + 1)
    if z:
        step = max(step, min(hi, lo) / z)
    return float(np.nextafter(np.float32(step), np.float32(np.inf)))


def assert_within_zero_grid_bound(
    x: np.ndarray, out: np.ndarray, bits: int, grs: list[slice], factor: float = 0.5
) -> None:
    for g in grs:
        xs, os_ = x[g].astype(np.float64), out[g].astype(np.float64)
        if xs.size == 0:
            continue
        bound = factor * zero_grid_step(xs, bits) + U * np.abs(xs).max() + 2.0**-149
        long_side = np.sign(xs.max() + xs.min()) or 1.0  # one bit: {0, step}; the short side rounds to 0
        on_grid = np.sign(xs) != -long_side if bits == 1 else np.ones(xs.size, bool)
        assert np.abs(xs - os_)[on_grid].max(initial=0) <= bound, (g, np.abs(xs - os_).max(), bound)
        if factor == 0.5:  # nearest rounding onto a grid holding 0: never further than |x|
            assert (np.abs(xs - os_) <= np.abs(xs) * (1 + U) + 2.0**-149).all()


def heavy_tailed(seed: int, n: int = N, df: float = 1.5) -> np.ndarray:
    """Student-t with few degrees of freedom (df 1.5: infinite variance), a few channels far larger, a shift."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df, n) * 1e-3
    x[:27] *= 20
    return (x + 2e-4).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "layer", "channel"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmse_below_one_on_heavy_tailed_updates(bits: int, granularity: str, seed: int) -> None:
    x = heavy_tailed(seed)
    nmse = {}
    for option in ("grid=minmax", "grid=zero", "clip=mse"):
        p = Chain.parse(f"quantize:{bits},granularity={granularity},{option}")
        enc = p.encode(x, LAYOUT, CodecState())
        assert np.array_equal(p.decode(enc.data, LAYOUT, CodecState()), enc.reconstruction)
        nmse[option] = enc.stats.nmse
    assert nmse["grid=zero"] < 1 and nmse["clip=mse"] < 1, nmse
    assert nmse["clip=mse"] <= nmse["grid=zero"] * (1 + 1e-6), nmse  # kept only where it lowers the error


def test_min_max_grid_is_worse_than_zeros_where_the_zero_grid_is_not() -> None:
    """The issue this grid fixes: a symmetric heavy-tailed update, min-max levels far from zero."""
    layout = Layout.of({"w": np.zeros((100, 200))})
    for seed in (7, 8, 9):
        x = (np.random.default_rng(seed).standard_t(3, 20_000) * 1e-3).astype(np.float32)
        nmse = {
            g: Chain.parse(f"quantize:2,grid={g}").encode(x, layout).stats.nmse for g in ("minmax", "zero")
        }
        assert nmse["minmax"] > 1 > nmse["zero"], nmse


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "layer", "channel"])
def test_zero_grid_error_at_most_half_a_step(bits: int, granularity: str) -> None:
    x = vec(bits)
    x[:27] *= 50
    x[30:40] = 0.0
    out, data = round_trip(f"quantize:{bits},granularity={granularity}", x)  # the default on the dense model
    grs = groups(LAYOUT, N, granularity)
    assert_within_zero_grid_bound(x, out, bits, grs)
    assert (out[30:40] == 0).all()  # zero is a level
    side = 1 + 4 * len(grs)  # flags, one step per group
    assert len(data) == 1 + len(encode_varint(side)) + side + 1 + (N * bits + 7) // 8


def test_zero_grid_mirrors_for_a_negative_long_side() -> None:
    x = -np.abs(vec(9))
    x[0] = 0.1  # a little on the positive side
    out, data = round_trip("quantize:4", x)
    assert_within_zero_grid_bound(x, out, 4, [slice(0, N)])
    assert np.frombuffer(data[3:7], "<f4")[0] < 0  # the header's step: negative, so 8 levels go below zero
    assert out.min() == pytest.approx(x.min(), rel=1e-6)


def test_clip_bound_and_its_error() -> None:
    x = (np.random.default_rng(3).standard_t(2, N) * 1e-3).astype(np.float32)
    out, data = round_trip("quantize:4,clip=mse", x)
    step = abs(float(np.frombuffer(data[3:7], "<f4")[0]))
    plain = zero_grid_step(x.astype(np.float64), 4)
    assert step < 0.9 * plain  # the heavy tail is clipped: a finer grid
    # Inside the grid half a step; beyond it the distance to the grid's end, on either side (z = 7).
    top, bottom = 8 * step, -7 * step
    inside = (x <= top) & (x >= bottom)
    err = np.abs(x.astype(np.float64) - out)
    assert (err[inside] <= step / 2 * (1 + 1e-5) + U * np.abs(x).max()).all()
    expected = np.where(x > top, x - top, bottom - x)[~inside]
    assert np.allclose(err[~inside], expected, rtol=1e-5, atol=U * np.abs(x).max())
    assert (err <= np.abs(x) * (1 + U) + 2.0**-149).all()


def test_sparse_values_keep_seed_003s_grid_by_default() -> None:
    """auto: after a sparsifier (no layout) min-max, so `topk | quantize` and its bytes are as before."""
    x = heavy_tailed(4)
    assert round_trip("topk:0.1 | quantize:4", x)[1] == round_trip("topk:0.1 | quantize:4,grid=minmax", x)[1]
    assert round_trip("quantize:4", x)[1] != round_trip("quantize:4,grid=minmax", x)[1]
    assert Chain.parse("quantize:4").get_config() == [
        {"id": "quantize", "bits": 4, "granularity": "tensor", "rounding": "nearest", "seed": None}
    ]
    assert Chain.parse("quantize:4,clip=mse").get_config()[0]["clip"] == "mse"


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "layer", "channel"])
def test_nearest_error_at_most_half_a_step(bits: int, granularity: str) -> None:
    x = vec(bits)
    x[:27] *= 50  # one filter far larger than the rest
    out, data = round_trip(f"quantize:{bits},granularity={granularity},grid=minmax", x)
    grs = groups(LAYOUT, N, granularity)
    assert_within_bound(x, out, bits, grs)
    # Exact size: version, header length, flags, (lo, step) per group, raw's empty header, packed body.
    side = 1 + 8 * len(grs)
    assert len(data) == 1 + len(encode_varint(side)) + side + 1 + (N * bits + 7) // 8
    # The extremes of every group are reproduced exactly (lo) or within the bound (hi).
    for g in grs:
        assert out[g].min() == x[g].min()


def test_finer_granularity_helps_small_channels() -> None:
    x = vec(1)
    x[:27] *= 1000
    err = {
        g: np.abs(round_trip(f"quantize:4,granularity={g},grid=minmax", x)[0] - x)[27:162].max()
        for g in ("tensor", "layer", "channel")
    }
    assert err["channel"] < err["layer"] / 10 and err["layer"] <= err["tensor"]


def test_without_a_layout_every_granularity_is_one_group() -> None:
    # After a sparsifier the kept values carry no layout: channel/layer fall back to the whole input.
    x = vec(2)
    a, da = round_trip("topk:0.3 | quantize:4,granularity=channel", x)
    b, db = round_trip("topk:0.3 | quantize:4", x)
    assert np.array_equal(a, b) and len(da) == len(db)
    spec = ArraySpec(np.float32, 100)
    side, y = Quantize(4, granularity="layer").encode(vec(3, 100), spec, {})
    assert len(side) == 1 + 8
    assert Quantize(4, granularity="layer").output_spec(spec, side) == ArraySpec(
        np.uint8, 100, symbols=(0, 15)
    )


def test_constant_and_empty_inputs() -> None:
    x = np.full(N, 3.25, np.float32)
    for g in ("tensor", "layer", "channel"):
        out, _ = round_trip(f"quantize:2,granularity={g}", x)
        assert np.array_equal(out, x)
    empty = Layout.of({"e": np.zeros((0, 3))})
    for chain in ("quantize:8", "quantize:1,granularity=channel", "quantize:2,rounding=stochastic"):
        out, _ = round_trip(chain, np.zeros(0, np.float32), empty)
        assert out.size == 0


def test_extreme_but_finite_values() -> None:
    x = vec(4) * np.float32(1e17)  # (larger values overflow the float32 NMSE the chain reports)
    out, _ = round_trip("quantize:8,grid=minmax", x)
    assert_within_bound(x, out, 8, [slice(0, N)])
    out, _ = round_trip("quantize:8", x)
    assert_within_zero_grid_bound(x, out, 8, [slice(0, N)])
    x = np.array([-3e38, 3e38] * 6, np.float32)  # max - min is beyond float32
    with pytest.raises(CodecError, match="exceeds float32"):
        Chain.parse("quantize:8,grid=minmax").encode(x, Layout.of({"v": x}))
    # The zero grid's levels never reach past max |x|: the full float32 range quantizes.
    q, spec = Quantize(8, grid="zero"), ArraySpec(np.float32, x.size)
    side, y = q.encode(x, spec, {})
    assert np.array_equal(q.decode(side, y, spec, {}), x)


def test_stochastic_rounding_is_unbiased_and_within_a_step() -> None:
    x = vec(5, 64)
    layout = Layout.of({"v": x})
    trials = 800
    outs = np.stack(
        [
            round_trip(f"quantize:2,rounding=stochastic,seed={i},grid=minmax", x, layout)[0]
            for i in range(trials)
        ]
    )
    step = float(x.max() - x.min()) / 3
    assert np.abs(outs - x).max() < step * (1 + 1e-5)
    # Each entry's error has standard deviation <= step / 2; the mean of `trials` is 5 sigma within.
    assert np.abs(outs.mean(axis=0) - x).max() < 5 * (step / 2) / np.sqrt(trials)
    # Nearest rounding is biased for the same input; stochastic is not.
    nearest = round_trip("quantize:2,grid=minmax", x, layout)[0]
    assert np.abs(nearest - x).mean() > 3 * np.abs(outs.mean(axis=0) - x).mean()


def test_stochastic_seed_makes_messages_reproducible() -> None:
    x = vec(6)
    a = round_trip("quantize:4,rounding=stochastic,seed=11", x)[1]
    b = round_trip("quantize:4,rounding=stochastic,seed=11", x)[1]
    c = round_trip("quantize:4,rounding=stochastic,seed=12", x)[1]
    d = round_trip("quantize:4,rounding=stochastic", x)[1]
    e = round_trip("quantize:4,rounding=stochastic", x)[1]
    assert a == b and a != c and d != e
    # Another input with the same seed rounds independently (the seed hashes the input too).
    assert round_trip("quantize:4,rounding=stochastic,seed=11", x + 1)[1][:7] != a[:7]


@pytest.mark.parametrize(
    "config",
    [
        {"bits": 3},
        {"bits": 16},
        {"bits": True},
        {"bits": "4"},
        {"granularity": "row"},
        {"rounding": "up"},
        {"seed": -1},
        {"seed": 1.5},
        {"seed": 2**64},
        {"levels": 4},
        {"grid": "symmetric"},
        {"clip": "max"},
        {"grid": "minmax", "clip": "mse"},
    ],
)
def test_bad_configs_are_refused(config: dict) -> None:
    with pytest.raises(CodecError):
        Chain.from_config([{"id": "quantize", **config}])


def test_chain_string_syntax() -> None:
    p = Chain.parse("quantize:2,granularity=channel,rounding=stochastic,seed=3")
    assert p.get_config() == [
        {"id": "quantize", "bits": 2, "granularity": "channel", "rounding": "stochastic", "seed": 3}
    ]
    assert Chain.parse("quantize").get_config()[0]["bits"] == 8


def test_header_values_are_checked() -> None:
    q = Quantize(4, granularity="layer", grid="minmax")
    spec = ArraySpec(np.float32, SMALL.numel, SMALL)
    side, _ = q.encode(vec(7, SMALL.numel), spec, {})
    assert len(side) == 1 + 2 * 8
    bad_headers = [
        side[:-1],
        side + b"\x00",
        b"\x01" + side[1:],  # says stochastic, configured nearest
        b"\x02" + side[1:],
        side[:1] + struct.pack("<ff", 0.0, -1.0) + side[9:],  # negative step
        side[:1] + struct.pack("<ff", np.inf, 1.0) + side[9:],
        side[:1] + struct.pack("<ff", np.nan, 1.0) + side[9:],
        side[:1] + struct.pack("<ff", 3e38, 1e37) + side[9:],  # grid runs beyond float32
    ]
    for bad in bad_headers:
        with pytest.raises(CodecError):
            q.output_spec(spec, bad)
    zero = Quantize(4, granularity="layer")
    side, _ = zero.encode(vec(7, SMALL.numel), spec, {})
    assert side[0] == 2 and len(side) == 1 + 2 * 4  # flags, then one signed f32 step per group
    for bad in [side[:-1], side + b"\x00", b"\x00" + side[1:], b"\x03" + side[1:], side[:1] + struct.pack("<f", np.inf) + side[5:],
                side[:1] + struct.pack("<f", np.nan) + side[5:], side[:1] + struct.pack("<f", 1e38) + side[5:]]:  # fmt: skip
        with pytest.raises(CodecError):
            zero.output_spec(spec, bad)
    with pytest.raises(CodecError, match="flags"):  # a seed 003 message read as the new grid, and back
        zero.output_spec(spec, q.encode(vec(7, SMALL.numel), spec, {})[0])


@pytest.mark.parametrize(
    "chain",
    [
        "quantize:8",
        "quantize:1,granularity=channel",
        "quantize:2,granularity=layer,rounding=stochastic",
        "quantize:4 | entropy",
        "quantize:4 | zstd",
        "quantize:4,grid=minmax | entropy",
        "quantize:2,granularity=channel,clip=mse",
    ],  # fmt: skip
)
def test_truncated_padded_and_corrupt_messages(chain: str) -> None:
    p = Chain.parse(chain)
    data = p.encode(vec(8, SMALL.numel), SMALL, CodecState()).data
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            p.decode(data[:cut], SMALL, CodecState())
    for extra in (b"\x00", b"\x01\x02", bytes(40)):
        with pytest.raises(CodecError):
            p.decode(data + extra, SMALL, CodecState())
    for pos in range(len(data)):
        for flip in (0x01, 0x10, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= flip
            try:
                out = p.decode(bytes(bad), SMALL, CodecState())
            except CodecError:
                continue
            assert out.shape == (SMALL.numel,) and out.dtype == np.float32 and np.isfinite(out).all()


# -- properties ----------------------------------------------------------------------------------
@st.composite
def layouts_and_vectors(draw: st.DrawFn, max_abs: float = 1e6) -> tuple[Layout, np.ndarray]:
    shapes = draw(st.lists(st.lists(st.integers(0, 5), max_size=3).map(tuple), min_size=1, max_size=3))
    layout = Layout.of({f"t{i}": np.zeros(s) for i, s in enumerate(shapes)})
    x = draw(arrays(np.float32, layout.numel, elements=st.floats(-max_abs, max_abs, width=32)))
    return layout, x


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=layouts_and_vectors(),
    bits=st.sampled_from([1, 2, 4, 8]),
    granularity=st.sampled_from(["tensor", "layer", "channel"]),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    grid=st.sampled_from(["minmax", "zero"]),
)
def test_property_round_trip_within_bound(
    case: tuple[Layout, np.ndarray], bits: int, granularity: str, rounding: str, grid: str
) -> None:
    layout, x = case
    chain = f"quantize:{bits},granularity={granularity},rounding={rounding},seed=1,grid={grid}"
    out, _ = round_trip(chain, x, layout)
    assert np.isfinite(out).all()
    within = assert_within_bound if grid == "minmax" else assert_within_zero_grid_bound
    within(x, out, bits, groups(layout, layout.numel, granularity), 0.5 if rounding == "nearest" else 1.0)
    p = Chain.parse(chain)
    assert Chain.from_config(json.loads(json.dumps(p.get_config()))).get_config() == p.get_config()


# -- golden fixtures: this wire format stays readable -----------------------------------------------
GOLDEN_CHAINS = {  # seed 003's grid (the default before grid existed), and the zero grid
    "quantize8_tensor": "quantize:8,grid=minmax",
    "quantize2_layer_stochastic": "quantize:2,granularity=layer,rounding=stochastic,seed=5,grid=minmax",
    "quantize1_channel_entropy": "quantize:1,granularity=channel,grid=minmax | entropy",
    "quantize4_zero_layer": "quantize:4,granularity=layer",
    "quantize2_mse_channel_entropy": "quantize:2,granularity=channel,clip=mse | entropy",
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CHAINS))
def test_golden_fixtures_decode_identically(name: str) -> None:
    p = Chain.parse(GOLDEN_CHAINS[name])
    blob, expected = GOLDEN / f"{name}.bin", GOLDEN / f"{name}.npy"
    if not blob.exists():  # written once, then committed
        enc = p.encode(vec(42), LAYOUT, CodecState())
        blob.write_bytes(enc.data)
        np.save(expected, enc.reconstruction, allow_pickle=False)
    out = p.decode(blob.read_bytes(), LAYOUT, CodecState())
    assert np.array_equal(out, np.load(expected, allow_pickle=False))
