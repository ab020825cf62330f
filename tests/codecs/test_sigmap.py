"""Context-coded significance maps (`sigmap.py`, `positions=context`): exact round trips, size against
log2 C(n, k) and against Golomb-Rice, strict decoding of hostile bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import CodecError, CodecState, Layout, Pipeline
from fedsqueeze.codecs.base import ArraySpec
from fedsqueeze.codecs.positions import encode_positions
from fedsqueeze.codecs.sigmap import decode_mask, encode_mask, matrix_shapes
from fedsqueeze.codecs.sparse import code_positions, read_positions

LAYOUT = Layout.of({"w1": np.zeros((384, 40)), "b1": np.zeros(384), "w2": np.zeros((128, 384)), "b2": np.zeros(128),
                    "conv": np.zeros((8, 4, 3)), "scalar": np.zeros(())})  # fmt: skip
SPEC = ArraySpec(np.float32, LAYOUT.numel, LAYOUT)


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
    assert matrix_shapes(ArraySpec(np.float32, 50, LAYOUT)) == [(1, 50)]  # a layout of another size is ignored


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
    idx = top(outer_product_update(seed), k) if structured and k else np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
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
    assert idx.size == k and (np.diff(idx) > 0).all() and (idx.size == 0 or 0 <= idx[0] and idx[-1] < SPEC.count)


@pytest.mark.parametrize("chain", ["stc:0.01,positions=context | entropy", "topk:0.02,positions=context | quantize:4 | entropy",
                                   "prune:0.95,positions=context", "residual | lattice:0.1,positions=context | entropy"])  # fmt: skip
def test_chains_decode_what_rice_decodes_in_fewer_bytes(chain: str) -> None:
    rice = chain.replace(",positions=context", "")
    x = (0.3 * outer_product_update(4)).astype(np.float32)
    sent = {}
    for c in (chain, rice):
        pipe = Pipeline.parse(c)
        enc_state, dec_state = CodecState(), CodecState()
        encoded = pipe.encode(x, LAYOUT, enc_state)
        decoded = pipe.decode(encoded.data, LAYOUT, dec_state)
        sent[c] = (len(encoded.data), decoded)
    assert np.array_equal(sent[chain][1], sent[rice][1])
    assert sent[chain][0] < sent[rice][0]
