"""`raw`'s bit packing of integer symbols: MSB first, ceil(n * width / 8) bytes, at every width."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsqueeze.codecs import CodecError
from fedsqueeze.codecs.raw import pack_symbols, symbol_bits, unpack_symbols


@st.composite
def symbol_arrays(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, int]]:
    width = draw(st.integers(1, 16))
    lo = draw(st.integers(-(1 << 15), 1 << 10))
    hi = lo + draw(st.integers((1 << (width - 1)) if width > 1 else 1, (1 << width) - 1))
    values = draw(st.lists(st.integers(lo, hi), max_size=70))
    return np.array(values, dtype=np.int64), (lo, hi)


@given(symbol_arrays())
def test_packed_symbols_round_trip_in_the_fewest_bytes(case: tuple[np.ndarray, tuple[int, int]]) -> None:
    values, symbols = case
    data = pack_symbols(values, symbols)
    assert len(data) == (values.size * symbol_bits(symbols) + 7) // 8
    assert np.array_equal(unpack_symbols(data, values.size, symbols, np.dtype(np.int64)), values)


@pytest.mark.parametrize(
    ("values", "symbols", "packed"),
    [
        ([1, 0, 1], (0, 1), bytes([0b10100000])),
        ([3, 0, 1], (0, 3), bytes([0b11000100])),
        ([-8, 7, 0], (-8, 7), bytes([0x0F, 0x80])),
        ([5, 0, 2], (0, 7), bytes([0b10100001, 0])),
        ([200, 7], (0, 255), bytes([200, 7])),
        ([1, 1023], (0, 1023), bytes([0b00000000, 0b01111111, 0b11110000])),
    ],
)
def test_symbols_are_packed_most_significant_bit_first(
    values: list[int], symbols: tuple[int, int], packed: bytes
) -> None:
    assert pack_symbols(np.array(values), symbols) == packed


def test_a_packed_symbol_above_the_maximum_is_refused() -> None:
    with pytest.raises(CodecError, match="above the declared maximum 5"):
        unpack_symbols(bytes([0b11111111]), 2, (0, 5), np.dtype(np.int8))
