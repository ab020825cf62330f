"""Context-coded significance maps (`sigmap.py`, `positions=context`): exact round trips, size against
log2 C(n, k) and against Golomb-Rice, format 2 against format 1, golden maps, strict decoding of hostile bytes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import Chain, CodecError, CodecState, Layout, sigmap
from fedsqueeze.codecs.base import ArraySpec
from fedsqueeze.codecs.positions import encode_positions
from fedsqueeze.codecs.sigmap import decode_mask, encode_mask, matrix_shapes
from fedsqueeze.codecs.sparse import code_positions, read_positions

LAYOUT = Layout.of({"w1": np.zeros((384, 40)), "b1": np.zeros(384), "w2": np.zeros((128, 384)), "b2": np.zeros(128),
                    "conv": np.zeros((8, 4, 3)), "scalar": np.zeros(())})  # fmt: skip
SPEC = ArraySpec(np.float32, LAYOUT.numel, LAYOUT)
GOLDEN = Path(__file__).parent / "golden"


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def outer_product_update(seed: int) -> np.ndarray:
    """A layer update shaped like a gradient, sum of delta x^T: heavy-tailed row and column scales."""
    rng = np.random.default_rng(seed)
    parts = []
    for t in LAYOUT:
        if len(t.shape) >= 2:
            rows, cols = t.shape[0], t.numel // t.shape[0]
            parts.append((rng.standard_normal((rows, 1)) ** 3 * rng.standard_normal((1, cols)) ** 3).ravel())
        else:
            parts.append(rng.standard_normal(t.numel))
    return np.concatenate(parts)


def top(x: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k :]).astype(np.int64)


def test_shapes_follow_the_layout() -> None:
    assert matrix_shapes(SPEC) == [(384, 40), (1, 384), (128, 384), (1, 128), (8, 12), (1, 1)]
    assert matrix_shapes(ArraySpec(np.float32, 50)) == [(1, 50)]
    # a layout of another size is ignored
    assert matrix_shapes(ArraySpec(np.float32, 50, LAYOUT)) == [(1, 50)]


# Measured when this was written: 0.55-0.65 of the Golomb-Rice size at k = 0.5 %, 0.6-0.7 at 10 %.
@pytest.mark.parametrize("fraction", [0.005, 0.02, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_row_and_column_structure_codes_well_below_the_uniform_bound(fraction: float, seed: int) -> None:
    x = outer_product_update(seed)
    idx = top(x, int(fraction * x.size))
    data = encode_mask(idx, SPEC)
    assert np.array_equal(decode_mask(data, SPEC, idx.size, "t"), idx)
    assert 8 * len(data) < 0.8 * log2_binomial(x.size, idx.size)
    assert len(data) < 0.8 * len(encode_positions(idx, x.size))


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5])
def test_unstructured_positions_cost_little_more_than_the_bound(fraction: float) -> None:
    n = SPEC.count
    idx = np.sort(np.random.default_rng(3).choice(n, int(fraction * n), replace=False)).astype(np.int64)
    data = encode_mask(idx, SPEC)
    assert np.array_equal(decode_mask(data, SPEC, idx.size, "t"), idx)
    assert 8 * len(data) <= 1.08 * log2_binomial(n, idx.size) + 200  # + per-tensor counts and coder flush


@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0), st.booleans())
@settings(max_examples=60, deadline=None)
def test_round_trip_any_mask(seed: int, fraction: float, structured: bool) -> None:
    rng = np.random.default_rng(seed)
    n = SPEC.count
    k = int(round(fraction * n))
    idx = (
        top(outer_product_update(seed), k)
        if structured and k
        else np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    )
    assert np.array_equal(decode_mask(encode_mask(idx, SPEC), SPEC, k, "t"), idx)


@pytest.mark.parametrize("k", [0, 1, 2, 40, 15359, 15360, 15361])
def test_edge_counts(k: int) -> None:
    idx = np.arange(k, dtype=np.int64)  # fills w1 row by row (w1 holds 15,360 entries)
    assert np.array_equal(decode_mask(encode_mask(idx, SPEC), SPEC, k, "t"), idx)


def test_never_more_than_a_byte_worse_than_rice() -> None:
    rng = np.random.default_rng(5)
    for n, k in [(10, 3), (1000, 7), (SPEC.count, 30)]:
        spec = ArraySpec(np.float32, n) if n != SPEC.count else SPEC
        idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        data = code_positions(idx, spec, "context")
        assert len(data) <= len(encode_positions(idx, n)) + 1
        assert np.array_equal(read_positions(data, spec, k, "context", "t"), idx)


def test_hostile_maps_are_refused() -> None:
    idx = top(outer_product_update(0), 300)
    data = encode_mask(idx, SPEC)
    with pytest.raises(CodecError, match="different number of entries"):
        decode_mask(data, SPEC, 301, "t")
    with pytest.raises(CodecError, match="different number of tensors"):
        decode_mask(data, ArraySpec(np.float32, 1000), 300, "t")
    for cut in (1, 2, len(data) // 2, len(data) - 1):
        with pytest.raises(CodecError):
            decode_mask(data[:cut], SPEC, 300, "t")
    with pytest.raises(CodecError, match="unknown"):
        read_positions(b"\x07" + data, SPEC, 300, "context", "t")


@given(st.binary(max_size=300), st.integers(0, 2000))
@settings(max_examples=200, deadline=None)
def test_random_bytes_decode_or_raise_codec_error(data: bytes, k: int) -> None:
    try:
        idx = decode_mask(data, SPEC, k, "t")
    except CodecError:
        return
    assert (
        idx.size == k and (np.diff(idx) > 0).all() and (idx.size == 0 or 0 <= idx[0] and idx[-1] < SPEC.count)
    )


@pytest.mark.parametrize("chain", ["stc:0.01,positions=context | entropy", "topk:0.02,positions=context | quantize:4 | entropy",
                                   "prune:0.95,positions=context", "residual | lattice:0.1,positions=context | entropy"])  # fmt: skip
def test_chains_decode_what_rice_decodes_in_fewer_bytes(chain: str) -> None:
    rice = chain.replace(",positions=context", "")
    x = (0.3 * outer_product_update(4)).astype(np.float32)
    sent = {}
    for c in (chain, rice):
        pipe = Chain.parse(c)
        enc_state, dec_state = CodecState(), CodecState()
        encoded = pipe.encode(x, LAYOUT, enc_state)
        decoded = pipe.decode(encoded.data, LAYOUT, dec_state)
        sent[c] = (len(encoded.data), decoded)
    assert np.array_equal(sent[chain][1], sent[rice][1])
    assert sent[chain][0] < sent[rice][0]


# -- format 2: the same model coded as counts (maps over BITWISE_MAX entries) ---------------------------
def _both(idx: np.ndarray, spec: ArraySpec = SPEC) -> tuple[bytes, bytes]:
    return encode_mask(idx, spec, version=1), encode_mask(idx, spec, version=2)


@pytest.mark.parametrize("fraction", [0.0005, 0.005, 0.02, 0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("structured", [True, False])
def test_format_2_codes_what_format_1_codes_in_as_many_bytes(fraction: float, structured: bool) -> None:
    """Both code every entry at the model's probability; format 2 as chunk counts (Binomial) and subset
    ranks, whose product is that probability, so the sizes agree to the coder's rounding (a few bytes)."""
    for seed in (0, 1):
        x = outer_product_update(seed)
        k = max(1, int(fraction * x.size))
        idx = (
            top(x, k)
            if structured
            else np.sort(np.random.default_rng(seed).choice(x.size, k, replace=False)).astype(np.int64)
        )
        one, two = _both(idx)
        assert two[0] == 0 and one[0] != 0
        assert np.array_equal(decode_mask(two, SPEC, k, "t"), idx)
        # the marker byte, a coder word
        assert len(two) <= len(one) + 5 + 0.005 * len(one), (
            len(one),
            len(two),
        )


@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0), st.booleans())
@settings(max_examples=60, deadline=None)
def test_format_2_round_trips_and_matches_the_reference_walk(
    seed: int, fraction: float, structured: bool
) -> None:
    """The encoder computes all rounds at once; the decoder's walk with known values (the reference)
    must give the same bytes."""
    rng = np.random.default_rng(seed)
    n = SPEC.count
    k = int(round(fraction * n))
    idx = (
        top(outer_product_update(seed), k)
        if structured and k
        else np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    )
    data = encode_mask(idx, SPEC, version=2)
    assert data == sigmap._encode_counts(idx, SPEC, reference=True)
    assert np.array_equal(decode_mask(data, SPEC, k, "t"), idx)


@pytest.mark.parametrize("k", [0, 1, 2, 40, 15359, 15360, 15361])
def test_format_2_edge_counts(k: int) -> None:
    idx = np.arange(k, dtype=np.int64)
    assert np.array_equal(decode_mask(encode_mask(idx, SPEC, version=2), SPEC, k, "t"), idx)
    single = ArraySpec(np.float32, 5000)  # no layout: one row
    idx = np.sort(np.random.default_rng(k).choice(5000, min(k, 5000), replace=False)).astype(np.int64)
    assert np.array_equal(decode_mask(encode_mask(idx, single, version=2), single, idx.size, "t"), idx)


def test_the_format_follows_the_map_size() -> None:
    """Up to BITWISE_MAX entries format 1, so every map of a model that size keeps its bytes; above, format 2."""
    idx = top(outer_product_update(0), 300)
    assert encode_mask(idx, SPEC) == encode_mask(idx, SPEC, version=1)
    big = Layout.of({"w": np.zeros((1100, 1000)), "b": np.zeros(1000)})
    spec = ArraySpec(np.float32, big.numel, big)
    assert spec.count > sigmap.BITWISE_MAX
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1100, 1)) ** 3 * rng.standard_normal((1, 1000)) ** 3).ravel()
    idx = top(np.concatenate([x, rng.standard_normal(1000)]), 5000)
    data = encode_mask(idx, spec)
    assert data[:1] == sigmap.FORMAT2 and np.array_equal(decode_mask(data, spec, idx.size, "t"), idx)
    with pytest.raises(CodecError, match="unknown format"):
        encode_mask(idx, spec, version=3)


def test_a_large_update_through_the_chain() -> None:
    """The recipe's uplink on a layer of 1.2M entries: format 2 on the wire, decoded by a fresh receiver."""
    rng = np.random.default_rng(2)
    layout = Layout.of({"w": np.zeros((1200, 1000)), "b": np.zeros(1200)})
    x = np.concatenate(
        [
            (rng.standard_normal((1200, 1)) ** 3 * rng.standard_normal((1, 1000)) ** 3).ravel(),
            rng.standard_normal(1200),
        ]
    )
    x = x.astype(np.float32)
    chain = Chain.parse("ef:0.8 | stc:0.005,positions=context | entropy")
    rice = Chain.parse("ef:0.8 | stc:0.005 | entropy")
    enc = chain.encode(x, layout, CodecState())
    out = chain.decode(enc.data, layout, CodecState())
    assert np.array_equal(out, enc.reconstruction) and np.count_nonzero(out) == math.ceil(0.005 * x.size)
    assert np.array_equal(out, rice.decode(rice.encode(x, layout, CodecState()).data, layout, CodecState()))
    assert len(enc.data) < 0.9 * len(rice.encode(x, layout, CodecState()).data)


GOLDEN_MAPS = {"sigmap_format1": 1, "sigmap_format2": 2}


@pytest.mark.parametrize("name", sorted(GOLDEN_MAPS))
def test_golden_maps_decode_identically(name: str) -> None:
    """Both formats stay readable: bytes recorded once, with the positions they hold."""
    blob, expected = GOLDEN / f"{name}.bin", GOLDEN / f"{name}.npy"
    if not blob.exists():  # written once, then committed
        idx = top(outer_product_update(11), 500)
        blob.write_bytes(encode_mask(idx, SPEC, version=GOLDEN_MAPS[name]))
        np.save(expected, idx, allow_pickle=False)
    idx = np.load(expected, allow_pickle=False)
    assert np.array_equal(decode_mask(blob.read_bytes(), SPEC, idx.size, "t"), idx)
    # and the encoder still writes them
    assert encode_mask(idx, SPEC, version=GOLDEN_MAPS[name]) == blob.read_bytes()


def test_hostile_format_2_maps_are_refused() -> None:
    idx = top(outer_product_update(0), 300)
    data = encode_mask(idx, SPEC, version=2)
    with pytest.raises(CodecError, match="different number of entries"):
        decode_mask(data, SPEC, 301, "t")
    with pytest.raises(CodecError, match="different number of tensors"):
        decode_mask(data, ArraySpec(np.float32, 1000), 300, "t")
    for cut in (1, 2, len(data) // 2, len(data) - 1):
        with pytest.raises(CodecError):
            decode_mask(data[:cut], SPEC, 300, "t")
    rng = np.random.default_rng(0)
    for _ in range(300):  # flipped bits: a valid map of 300 entries, or CodecError
        bad = bytearray(data)
        bad[rng.integers(1, len(bad))] ^= 1 << rng.integers(8)
        try:
            out = decode_mask(bytes(bad), SPEC, 300, "t")
        except CodecError:
            continue
        assert out.size == 300 and (np.diff(out) > 0).all() and 0 <= out[0] and out[-1] < SPEC.count


@given(st.binary(max_size=300), st.integers(0, 2000))
@settings(max_examples=200, deadline=None)
def test_random_format_2_bytes_decode_or_raise_codec_error(data: bytes, k: int) -> None:
    try:
        idx = decode_mask(sigmap.FORMAT2 + data, SPEC, k, "t")
    except CodecError:
        return
    assert (
        idx.size == k and (np.diff(idx) > 0).all() and (idx.size == 0 or 0 <= idx[0] and idx[-1] < SPEC.count)
    )
