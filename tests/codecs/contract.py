"""The codec contract, as helpers any codec's tests can call (numcodecs' tests/common.py in spirit).

A chain keeps the contract when: the receiver reconstructs exactly what the sender's `Encoded`
says it will; wire bytes are the message's length; the output is finite float32 of the layout's
size; stages used by both sides (predictors) stay identical on both; the config round-trips
through JSON to a chain with the same fingerprint; and bad input (truncated or altered bytes,
another layout) is refused with CodecError, never another exception, or (a sparse message whose
positions fit a smaller model) decodes to finite float32 of that layout's size. Layout mismatches
between sender and receiver are caught before decoding, by the payload's fingerprint.
"""

from __future__ import annotations

import json

import numpy as np

from fedsqueeze.codecs import Chain, CodecError, CodecState, Layout


def check_chain_contract(chain_text: str, layout: Layout, messages: int = 4, seed: int = 0) -> None:
    chain = Chain.parse(chain_text)
    again = Chain.from_config(json.loads(json.dumps(chain.get_config())))
    assert again.fingerprint(layout) == chain.fingerprint(layout) and str(again) == str(chain)
    sender, receiver = CodecState(), CodecState()
    rng = np.random.default_rng(seed)
    last = b""
    for _ in range(messages):
        x = (rng.standard_normal(layout.numel) * rng.uniform(0.01, 2)).astype(np.float32)
        enc = chain.encode(x, layout, sender)
        out = chain.decode(enc.data, layout, receiver)
        assert np.array_equal(out, enc.reconstruction), (
            f"{chain_text}: the receiver decodes what the sender reconstructs"
        )
        assert enc.stats.wire_bytes == len(enc.data)
        assert out.dtype == np.float32 and out.shape == (layout.numel,) and np.isfinite(out).all()
        last = enc.data
    for i, stage in enumerate(chain.configured):
        if stage.stateful and stage.codec_id != "ef":  # error feedback lives on the sender only
            assert sender.fingerprint([i]) == receiver.fingerprint([i]), (
                f"{chain_text}: stage {i} out of sync"
            )
    for bad in (last[: len(last) // 2], last + b"\x00" * 7, b"\x07" + last[1:], b""):
        try:
            chain.decode(bad, layout, CodecState())
        except CodecError:
            pass
    smaller = Layout.of({"w": np.zeros(max(1, layout.numel - 1))})
    try:
        out = chain.decode(last, smaller, CodecState())
        assert out.dtype == np.float32 and out.shape == (smaller.numel,) and np.isfinite(out).all()
    except CodecError:
        pass
