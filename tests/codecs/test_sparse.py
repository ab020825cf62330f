"""Sparsifiers `topk`, `randk`, `prune`, `stc`: exact counts, values, hostile input, golden fixtures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import Chain, CodecError, CodecState, Layout
from fedsqueeze.codecs.sparse import kept_count

LAYOUT = Layout.of({"conv": np.zeros((4, 3, 3, 3)), "fc": np.zeros((10, 30)), "bias": np.zeros(10)})
N = LAYOUT.numel  # 418
GOLDEN = Path(__file__).parent / "golden"

CHAINS = [
    "topk:0.01",
    "topk:0.1",
    "topk:count=7",
    "topk:0.2,scope=layer",
    "topk:0.8",  # dense: positions coded as the complement
    "randk:0.1",
    "randk:0.1,unbiased=true,seed=3",
    "prune:0.9",
    "prune:0.5,scope=global",
    "stc:0.05",
    "stc:0.1 | entropy",
    "stc:0.1,positions=context | entropy",
    "topk:0.1,positions=context",
    "prune:0.9,positions=context",
    "topk:0.1 | entropy",  # refused: entropy needs symbols (checked separately)
]
ROUND_TRIP_CHAINS = [c for c in CHAINS if "topk:0.1 | entropy" != c]


def vec(seed: int = 0, n: int = N, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def round_trip(chain: str, x: np.ndarray, layout: Layout = LAYOUT) -> np.ndarray:
    p = Chain.parse(chain)
    enc = p.encode(x, layout, CodecState())
    out = p.decode(enc.data, layout, CodecState())
    assert np.array_equal(out, enc.reconstruction)
    assert out.dtype == np.float32 and out.shape == (layout.numel,)
    return out


# -- exact behaviour ------------------------------------------------------------------------------
def test_topk_keeps_exactly_k_entries_equal_to_the_input() -> None:
    x = vec(1)
    out = round_trip("topk:0.01", x)
    k = math.ceil(0.01 * N)
    kept = np.flatnonzero(out)
    assert kept.size == k
    assert np.array_equal(out[kept], x[kept])
    assert np.abs(x[kept]).min() >= np.abs(np.delete(x, kept)).max()


def test_topk_count_overrides_fraction_and_float_noise_adds_nothing() -> None:
    assert np.count_nonzero(round_trip("topk:0.5,count=7", vec(2))) == 7
    assert kept_count(100, 0.07) == 7  # 0.07 * 100 == 7.000000000000001 in binary
    assert kept_count(70, 0.1) == 7 and kept_count(1, 1e-300) == 1 and kept_count(10, 0.0) == 0
    layout = Layout.of({"v": np.zeros(100)})
    assert np.count_nonzero(round_trip("topk:0.07", vec(3, 100), layout)) == 7


def test_layer_scope_selects_per_tensor() -> None:
    x = vec(4)
    x[:108] *= 100  # the conv tensor dominates: global top-k would take only conv entries
    out = round_trip("topk:0.2,scope=layer", x)
    for t, sl in LAYOUT.slices():
        assert np.count_nonzero(out[sl]) == kept_count(t.numel, 0.2)
    glob = round_trip("topk:0.2", x)
    assert np.count_nonzero(glob[108:]) == 0


def test_prune_global_versus_layer() -> None:
    x = vec(5)
    x[108:408] *= 0.01  # a layer of small weights
    per_layer = round_trip("prune:0.9", x)  # scope=layer is prune's default (seed 003)
    for t, sl in LAYOUT.slices():
        assert np.count_nonzero(per_layer[sl]) == t.numel - math.floor(0.9 * t.numel)
    glob = round_trip("prune:0.9,scope=global", x)
    assert np.count_nonzero(glob) == N - math.floor(0.9 * N)
    assert np.count_nonzero(glob[108:408]) == 0  # global pruning removes the small layer entirely
    kept = np.flatnonzero(glob)
    assert np.array_equal(glob[kept], x[kept])


def test_prune_on_weights_keeps_the_largest() -> None:
    w = vec(6, scale=0.05)
    out = round_trip("prune:0.5,scope=global", w)
    kept = np.flatnonzero(out)
    assert kept.size == N // 2 + N % 2
    assert np.abs(w[kept]).min() >= np.abs(np.delete(w, kept)).max()


def test_stc_is_ternary_with_the_mean_magnitude() -> None:
    x = vec(7)
    out = round_trip("stc:0.05", x)
    kept = np.flatnonzero(out)
    assert kept.size == kept_count(N, 0.05)
    mu = np.abs(x[kept]).mean()
    assert np.allclose(np.abs(out[kept]), mu, rtol=1e-6)
    assert np.array_equal(np.sign(out[kept]), np.sign(x[kept]))
    assert np.abs(x[kept]).min() >= np.abs(np.delete(x, kept)).max()  # the positions are top-k


def test_stc_signs_are_one_bit_each() -> None:
    layout = Layout.of({"v": np.zeros(100_000)})
    x = vec(8, 100_000)
    enc = Chain.parse("stc:0.01").encode(x, layout)
    k = 1000
    positions_bits = 8.2 * k  # ~log2 C(1e5, 1e3) / k = 8.07 bits per position
    assert 8 * enc.stats.wire_bytes <= positions_bits + k + 16 * 8


def test_randk_sends_a_seed_and_draws_new_positions_every_message() -> None:
    p = Chain.parse("randk:0.1")
    k = kept_count(N, 0.1)
    sender, receiver = CodecState(), CodecState()
    seen = []
    for t in range(3):
        x = vec(t)
        enc = p.encode(x, LAYOUT, sender)
        assert len(enc.data) <= 4 * k + 12  # values + a few header bytes; no positions
        out = p.decode(enc.data, LAYOUT, receiver)
        assert np.array_equal(out, enc.reconstruction)
        kept = np.flatnonzero(out)
        assert kept.size == k and np.array_equal(out[kept], x[kept])
        seen.append(tuple(kept))
    assert len(set(seen)) == 3
    # The receiver needs no state: a fresh one decodes any message.
    assert np.array_equal(p.decode(enc.data, LAYOUT, CodecState()), enc.reconstruction)


def test_randk_unbiased_scales_by_n_over_k() -> None:
    x = vec(9)
    out = round_trip("randk:0.25,unbiased=true", x)
    k = kept_count(N, 0.25)
    kept = np.flatnonzero(out)
    assert np.allclose(out[kept], x[kept] * np.float32(N / k), rtol=1e-6)
    # Unbiased over many draws.
    p = Chain.parse("randk:0.25,unbiased=true")
    state = CodecState()
    mean = np.mean([p.encode(x, LAYOUT, state).reconstruction for _ in range(800)], axis=0)
    assert np.abs(mean - x).mean() < 0.15 * np.abs(x).mean()


def test_layer_scope_needs_the_dense_model() -> None:
    with pytest.raises(CodecError, match="dense model"):
        Chain.parse("topk:0.5 | topk:0.5,scope=layer").encode(vec(), LAYOUT)
    with pytest.raises(CodecError, match="put a quantizer"):
        Chain.parse("topk:0.1 | entropy").encode(vec(), LAYOUT)


@pytest.mark.parametrize(
    "config",
    [
        {"id": "topk", "fraction": 1.5},
        {"id": "topk", "fraction": True},
        {"id": "topk", "count": -1},
        {"id": "topk", "count": 2.5},
        {"id": "topk", "scope": "row"},
        {"id": "topk", "count": 3, "scope": "layer"},
        {"id": "prune", "rate": -0.1},
        {"id": "randk", "fraction": "half"},
        {"id": "stc", "fraction": 2},
        {"id": "stc", "mu": 1},
    ],
)
def test_bad_configs_are_refused(config: dict) -> None:
    with pytest.raises(CodecError):
        Chain.from_config([config])


# -- every chain: sync, JSON config, NaN, hostile input ---------------------------------------------
@pytest.mark.parametrize("chain", ROUND_TRIP_CHAINS)
def test_chain_round_trip_and_config(chain: str) -> None:
    p = Chain.parse(chain)
    sender, receiver = CodecState(), CodecState()
    for t in range(3):
        enc = p.encode(vec(t), LAYOUT, sender)
        assert np.array_equal(p.decode(enc.data, LAYOUT, receiver), enc.reconstruction)
    again = Chain.from_config(json.loads(json.dumps(p.get_config())))
    assert again.get_config() == p.get_config()
    assert Chain.parse(str(p)).get_config() == p.get_config()


@pytest.mark.parametrize("chain", ROUND_TRIP_CHAINS)
def test_nan_is_refused(chain: str) -> None:
    x = vec()
    x[11] = np.inf if "randk" in chain else np.nan
    with pytest.raises(CodecError, match="NaN"):
        Chain.parse(chain).encode(x, LAYOUT)


@pytest.mark.parametrize("chain", ROUND_TRIP_CHAINS)
def test_truncated_padded_and_corrupt_messages(chain: str) -> None:
    p = Chain.parse(chain)
    data = p.encode(vec(1), LAYOUT, CodecState()).data
    for cut in range(len(data)):  # every length
        with pytest.raises(CodecError):
            p.decode(data[:cut], LAYOUT, CodecState())
    for extra in (b"\x00", b"\x01\x02\x03"):
        with pytest.raises(CodecError):
            p.decode(data + extra, LAYOUT, CodecState())
    rng = np.random.default_rng(2)
    for _ in range(150):
        bad = bytearray(data)
        for _ in range(int(rng.integers(1, 3))):
            bad[int(rng.integers(len(bad)))] ^= int(rng.integers(1, 256))
        try:
            out = p.decode(bytes(bad), LAYOUT, CodecState())
        except CodecError:
            continue
        assert out.shape == (N,) and out.dtype == np.float32 and np.isfinite(out).all()


# -- properties -----------------------------------------------------------------------------------
layouts = st.lists(
    st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
).map(lambda shapes: Layout.of({f"t{i}": np.zeros(s) for i, s in enumerate(shapes)}))


@settings(max_examples=40, deadline=None)
@given(
    layout=layouts,
    fraction=st.floats(0.0, 1.0),
    scope=st.sampled_from(["global", "layer"]),
    scale=st.floats(1e-6, 1e6),
    seed=st.integers(0, 2**16),
)
def test_topk_and_prune_property(
    layout: Layout, fraction: float, scope: str, scale: float, seed: int
) -> None:
    x = vec(seed, layout.numel, scale)
    rate = 1.0 - fraction
    for chain, keep in (
        (f"topk:{fraction},scope={scope}", fraction),
        (f"prune:{rate},scope={scope}", 1.0 - rate),
    ):
        out = round_trip(chain, x, layout)
        kept = np.flatnonzero(out)
        assert np.array_equal(out[kept], x[kept])  # kept values are exact
        groups = [slice(0, layout.numel)] if scope == "global" else [sl for _, sl in layout.slices()]
        for sl in groups:
            part, dense = out[sl], x[sl]
            k = kept_count(dense.size, keep)
            assert np.count_nonzero(part) == k
            if 0 < k < dense.size:
                assert np.abs(dense[part != 0]).min() >= np.abs(dense[part == 0]).max()


@settings(max_examples=30, deadline=None)
@given(layout=layouts, fraction=st.floats(0.0, 1.0), unbiased=st.booleans(), seed=st.integers(0, 2**16))
def test_randk_and_stc_property(layout: Layout, fraction: float, unbiased: bool, seed: int) -> None:
    x = vec(seed, layout.numel)
    n, k = layout.numel, kept_count(layout.numel, fraction)
    out = round_trip(f"randk:{fraction},unbiased={json.dumps(unbiased)},seed={seed}", x, layout)
    scale = np.float32(n / k) if unbiased and k else np.float32(1)
    kept = np.flatnonzero(out)
    assert kept.size <= k
    assert np.allclose(out[kept], x[kept] * scale, rtol=1e-6)
    out = round_trip(f"stc:{fraction}", x, layout)
    kept = np.flatnonzero(out)
    assert kept.size == k
    if k:
        assert np.allclose(np.abs(out[kept]), np.abs(out[kept][0]))


# -- golden fixtures: the wire format stays stable ----------------------------------------------------
GOLDEN_CHAINS = {
    "sparse_topk_layer": "topk:0.2,scope=layer",
    "sparse_topk_dense": "topk:0.8",
    "sparse_prune_global": "prune:0.7,scope=global",
    "sparse_randk_unbiased": "randk:0.1,unbiased=true,seed=5",
    "sparse_stc": "stc:0.1",
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CHAINS))
def test_golden_fixtures_decode_identically(name: str) -> None:
    p = Chain.parse(GOLDEN_CHAINS[name])
    blob, expected = GOLDEN / f"{name}.bin", GOLDEN / f"{name}.npy"
    if not blob.exists():  # written once, then committed
        GOLDEN.mkdir(exist_ok=True)
        enc = p.encode(vec(42), LAYOUT, CodecState())
        blob.write_bytes(enc.data)
        np.save(expected, enc.reconstruction, allow_pickle=False)
    out = p.decode(blob.read_bytes(), LAYOUT, CodecState())
    assert np.array_equal(out, np.load(expected, allow_pickle=False))


@pytest.mark.parametrize(
    "chain",
    [
        "stc:0.1,positions=context | entropy",
        "topk:0.1,positions=context",
        "lattice:0.01,positions=context",
        "ef | filterscale:0.1 | entropy",
    ],
)
def test_sender_reuses_the_positions_it_coded(chain: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chain.encode rebuilds the receiver's view without decoding its own position map (the stage
    hands its positions back as the decode hint); the receiver, given only the bytes, decodes them
    and gets the same vector."""
    from fedsqueeze.codecs import filterscale, sparse

    x = np.random.default_rng(5).standard_normal(N).astype(np.float32) * 0.1
    chain_obj = Chain.parse(chain)
    calls: list[str] = []
    for module, name in (
        (sparse, "decode_mask"),
        (sparse, "decode_positions"),
        (filterscale, "decode_positions"),
    ):
        real = getattr(module, name)

        def counting(*args: object, _real: object = real, _name: str = name, **kwargs: object) -> np.ndarray:
            calls.append(_name)
            return _real(*args, **kwargs)  # type: ignore[operator,no-any-return]

        monkeypatch.setattr(module, name, counting)
    enc = chain_obj.encode(x, LAYOUT)
    assert calls == [], "the sender decoded the positions it had just coded"
    assert np.array_equal(chain_obj.decode(enc.data, LAYOUT), enc.reconstruction)
    assert calls, "the receiver must decode the positions"


@pytest.mark.parametrize("fraction", [1e-5, 0.001, 0.005, 0.05, 0.0625, 0.2])
def test_top_k_of_a_large_vector_is_the_full_partitions(fraction: float) -> None:
    """Above SAMPLED_TOP_K entries only the candidates above a sampled threshold are partitioned: the same set."""
    from fedsqueeze.codecs.sparse import SAMPLED_TOP_K, top_indices

    rng = np.random.default_rng(int(fraction * 1e6))
    n = SAMPLED_TOP_K + 12_345
    # layered scales
    x = (rng.standard_t(3, n) * np.repeat(rng.random(n // 1000 + 1) ** 4, 1000)[:n]).astype(np.float32)
    k = kept_count(n, fraction)
    reference = np.sort(np.argpartition(np.abs(x), n - k)[n - k :])
    assert np.array_equal(top_indices(x, k), reference)
    x[: n // 2] = 0.0  # ties at zero beyond the nonzeros: still k entries, all of the largest magnitudes
    got = top_indices(x, k)
    assert got.size == k and np.abs(x[got]).min() >= np.abs(np.delete(x, got)).max()
