"""Error feedback (`ef`): sent + remembered == sum of inputs, state handling, hostile input, golden."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import Chain, CodecError, CodecState, Layout

LAYOUT = Layout.of({"conv": np.zeros((4, 3, 3, 3)), "fc": np.zeros((10, 30)), "bias": np.zeros(10)})
N = LAYOUT.numel
GOLDEN = Path(__file__).parent / "golden"

TAILS = ["topk:0.1", "stc:0.05", "randk:0.1", "sign", "powersgd:2", "prune:0.8,scope=global"]


def vec(seed: int = 0, n: int = N, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def run(
    chain: str, xs: list[np.ndarray], layout: Layout = LAYOUT
) -> tuple[np.ndarray, np.ndarray, CodecState]:
    """Send every x; return (sum of decoded messages, final sender memory, sender state)."""
    p = Chain.parse(chain)
    sender, receiver = CodecState(), CodecState()
    total = np.zeros(layout.numel, np.float64)
    for x in xs:
        enc = p.encode(x, layout, sender)
        out = p.decode(enc.data, layout, receiver)
        assert np.array_equal(out, enc.reconstruction)
        total += out
    assert not receiver.stage(0)  # the receiver keeps nothing for ef
    return total, sender.stage(0)["memory"], sender


@pytest.mark.parametrize("tail", TAILS)
def test_sent_plus_memory_equals_the_sum_of_inputs(tail: str) -> None:
    xs = [vec(t) for t in range(8)]
    total, memory, _ = run(f"ef | {tail}", xs)
    assert memory.dtype == np.float32 and memory.shape == (N,)
    assert np.allclose(total + memory, np.sum(xs, axis=0, dtype=np.float64), atol=1e-4)


def test_error_feedback_delivers_what_plain_topk_drops() -> None:
    # A constant update: plain top-k sends the same 10 % forever; with ef every entry gets through.
    x = vec(3)
    xs = [x] * 30
    plain, _, _ = run("ef:0 | topk:0.1", xs)  # decay 0: memory discarded, plain top-k
    with_ef, _, _ = run("ef | topk:0.1", xs)
    assert np.count_nonzero(plain) == np.ceil(0.1 * N)
    assert np.count_nonzero(with_ef) > 0.7 * N  # small entries accumulate until they make the top 10 %
    target = 30 * x.astype(np.float64)
    assert np.linalg.norm(with_ef - target) < 0.5 * np.linalg.norm(plain - target)


def test_first_message_is_untouched_and_memory_is_the_residual() -> None:
    p = Chain.parse("ef | topk:0.1")
    state = CodecState()
    x = vec(4)
    enc = p.encode(x, LAYOUT, state)
    assert np.array_equal(state.stage(0)["memory"], x - enc.reconstruction)
    x2 = vec(5)
    enc2 = p.encode(x2, LAYOUT, state)
    kept = np.flatnonzero(enc2.reconstruction)
    corrected = x2 + (x - enc.reconstruction)
    assert np.allclose(enc2.reconstruction[kept], corrected[kept])


def test_decay_scales_the_memory() -> None:
    p = Chain.parse("ef:0.5 | topk:0.1")
    state = CodecState()
    x = vec(6)
    enc = p.encode(x, LAYOUT, state)
    assert np.allclose(state.stage(0)["memory"], 0.5 * (x - enc.reconstruction))


def test_memory_resets_when_the_model_size_changes() -> None:
    p = Chain.parse("ef | topk:0.1")
    state = CodecState()
    p.encode(vec(7), LAYOUT, state)
    small = Layout.of({"v": np.zeros(50)})
    x = vec(8, 50)
    enc = p.encode(x, small, state)  # no error: memory is reinitialised
    kept = np.flatnonzero(enc.reconstruction)
    assert np.array_equal(enc.reconstruction[kept], x[kept])
    assert state.stage(0)["memory"].shape == (50,)


def test_state_survives_a_checkpoint() -> None:
    p = Chain.parse("ef | topk:0.1")
    a = CodecState()
    for t in range(3):
        p.encode(vec(t), LAYOUT, a)
    b = CodecState.from_bytes(a.to_bytes())
    x = vec(9)
    assert np.array_equal(p.encode(x, LAYOUT, a).data, p.encode(x, LAYOUT, b).data)


@pytest.mark.parametrize(
    "config",
    [
        {"id": "ef", "decay": 1.5},
        {"id": "ef", "decay": -1},
        {"id": "ef", "decay": True},
        {"id": "ef", "memory": 1},
    ],
)
def test_bad_configs_are_refused(config: dict) -> None:
    with pytest.raises(CodecError):
        Chain.from_config([config, {"id": "topk"}])


def test_config_survives_json_and_nan_is_refused() -> None:
    p = Chain.parse("ef:0.9 | topk:0.1")
    assert Chain.from_config(json.loads(json.dumps(p.get_config()))).get_config() == p.get_config()
    x = vec()
    x[3] = np.nan
    state = CodecState()
    with pytest.raises(CodecError, match="NaN"):
        p.encode(x, LAYOUT, state)
    assert not state  # a refused message leaves the memory untouched


def test_hostile_messages() -> None:
    p = Chain.parse("ef | topk:0.1")
    state = CodecState()
    p.encode(vec(1), LAYOUT, state)
    data = p.encode(vec(2), LAYOUT, state).data
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            p.decode(data[:cut], LAYOUT, CodecState())
    with pytest.raises(CodecError):
        p.decode(data + b"\x00", LAYOUT, CodecState())
    # A header byte for ef (which has none) is refused.
    with pytest.raises(CodecError, match="unexpected header"):
        p.decode(bytes([data[0], 1, 0]) + data[2:], LAYOUT, CodecState())
    rng = np.random.default_rng(0)
    for _ in range(100):
        bad = bytearray(data)
        bad[int(rng.integers(len(bad)))] ^= int(rng.integers(1, 256))
        try:
            out = p.decode(bytes(bad), LAYOUT, CodecState())
        except CodecError:
            continue
        assert out.shape == (N,) and np.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    fraction=st.floats(0.0, 1.0),
    messages=st.integers(1, 6),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_conservation_property(n: int, fraction: float, messages: int, scale: float, seed: int) -> None:
    layout = Layout.of({"v": np.zeros(n)})
    xs = [vec(seed + t, n, scale) for t in range(messages)]
    total, memory, _ = run(f"ef | topk:{fraction}", xs, layout)
    expected = np.sum(xs, axis=0, dtype=np.float64)
    assert np.allclose(total + memory, expected, rtol=1e-5, atol=1e-5 * scale * messages)


def test_golden_fixture_decodes_identically() -> None:
    """The second message of `ef | topk:0.1` (it carries memory from the first)."""
    p = Chain.parse("ef | topk:0.1")
    blob, expected = GOLDEN / "ef_topk.bin", GOLDEN / "ef_topk.npy"
    if not blob.exists():  # written once, then committed
        GOLDEN.mkdir(exist_ok=True)
        state = CodecState()
        p.encode(vec(41), LAYOUT, state)
        enc = p.encode(vec(42), LAYOUT, state)
        blob.write_bytes(enc.data)
        np.save(expected, enc.reconstruction, allow_pickle=False)
    out = p.decode(blob.read_bytes(), LAYOUT, CodecState())
    assert np.array_equal(out, np.load(expected, allow_pickle=False))
