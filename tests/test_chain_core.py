"""The chain machinery and the foundation codecs: raw/identity, fp16, bf16, zstd."""

import json

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsqueeze.codecs import Chain, CodecError, CodecState, Layout, registered_codecs

LAYOUT = Layout.of({"w": np.zeros((6, 5)), "b": np.zeros(6)})


def vec(seed: int = 0, n: int = LAYOUT.numel) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("chain", ["identity", "raw", "zstd", "identity | zstd:1", "fp16 | zstd"])
def test_lossless_or_cast_round_trip(chain: str) -> None:
    p = Chain.parse(chain)
    x = vec()
    enc = p.encode(x, LAYOUT)
    out = p.decode(enc.data, LAYOUT)
    assert np.array_equal(out, enc.reconstruction)
    assert enc.stats.wire_bytes == len(enc.data)
    if "fp16" not in chain:
        assert np.array_equal(out, x)


def test_identity_is_fp32_plus_two_header_bytes() -> None:
    enc = Chain.parse("identity").encode(vec(), LAYOUT)
    assert len(enc.data) == LAYOUT.raw_bytes + 2


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=st.floats(-6e4, 6e4, width=32)))
def test_fp16_and_bf16_error_bounds(x: np.ndarray) -> None:
    layout = Layout.of({"v": x})
    for chain, rel in (("fp16", 2**-11), ("bf16", 2**-8)):
        out = Chain.parse(chain).decode(Chain.parse(chain).encode(x, layout).data, layout)
        bound = np.maximum(np.abs(x) * rel, 6e-8 if chain == "fp16" else 1e-38)
        assert np.all(np.abs(out - x) <= bound * 1.0001)


def test_fp16_refuses_out_of_range() -> None:
    with pytest.raises(CodecError, match="fp16"):
        Chain.parse("fp16").encode(np.full(LAYOUT.numel, 1e6, np.float32), LAYOUT)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(bad: float) -> None:
    x = vec()
    x[3] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        Chain.parse("identity").encode(x, LAYOUT)


def test_configs_survive_json_and_strings() -> None:
    p = Chain.parse("fp16 | zstd:7")
    again = Chain.from_config(json.loads(json.dumps(p.get_config())))
    assert again.get_config() == p.get_config() == [{"id": "fp16"}, {"id": "zstd", "level": 7}]
    assert str(Chain.parse(str(p))) == str(p)


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ("", "empty codec chain"),
        ("nope", "unknown codec 'nope'"),
        ("zstd:level=1,speed=3", "unknown parameter"),
        ("zstd | fp16", "follows a byte-level stage"),
        ("zstd:1,2", "positional"),
    ],
)
def test_bad_chains(chain: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        Chain.parse(chain)


@pytest.mark.parametrize("chain", ["identity", "fp16", "zstd", "bf16 | zstd"])
def test_truncated_corrupt_and_padded_messages_are_refused(chain: str) -> None:
    p = Chain.parse(chain)
    data = p.encode(vec(), LAYOUT).data
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            p.decode(data[:cut], LAYOUT)
    with pytest.raises(CodecError):
        p.decode(data + b"\x00", LAYOUT)
    rng = np.random.default_rng(0)
    for _ in range(200):
        bad = bytearray(data)
        bad[int(rng.integers(len(bad)))] ^= int(rng.integers(1, 256))
        try:
            out = p.decode(bytes(bad), LAYOUT)
        except CodecError:
            continue
        assert out.shape == (LAYOUT.numel,) and np.isfinite(out).all()


def test_zstd_bomb_is_refused_before_decompressing() -> None:
    p = Chain.parse("zstd")
    big = Layout.of({"w": np.zeros(10_000)})
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (64 << 20))  # 2 KiB that claims 64 MiB
    with pytest.raises(CodecError, match="claims"):
        p.decode(bytes([1, 0, 0]) + bomb, big)
    with pytest.raises(CodecError, match="exceeds the limit"):
        p.decode(bytes([1, 0, 0]) + bomb, LAYOUT)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * 100)
    with pytest.raises(CodecError, match="content size"):
        p.decode(bytes([1, 0, 0]) + no_size, LAYOUT)


def test_wrong_layout_is_refused() -> None:
    p = Chain.parse("identity")
    data = p.encode(vec(), LAYOUT).data
    with pytest.raises(CodecError):
        p.decode(data, Layout.of({"w": np.zeros((6, 7))}))
    # Same size, other shapes: only the payload fingerprint tells them apart.
    assert p.fingerprint(LAYOUT) != p.fingerprint(Layout.of({"w": np.zeros((6, 6))}))


def test_state_round_trips_through_safetensors() -> None:
    state = CodecState()
    state.stage(0)["memory"] = vec()
    state.stage(2)["history"] = vec(1).reshape(2, -1)
    state.messages = 7
    again = CodecState.from_bytes(state.to_bytes())
    assert again.fingerprint() == state.fingerprint() and again.messages == 7
    with pytest.raises(CodecError):
        CodecState.from_bytes(b"not safetensors")


def test_registry_lists_foundation_codecs() -> None:
    assert {"identity", "raw", "fp16", "bf16", "zstd"} <= set(registered_codecs())
