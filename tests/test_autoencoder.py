"""The `ae` stage, decoder validation, the plan's prepass settings and the savings maths (no servers)."""

from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import pytest

from fedsqueeze.aggregator import savings as sv
from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import Chain, CodecError, CodecState, Layout
from fedsqueeze.codecs.autoencoder import (
    Autoencoder,
    decoder_to_bytes,
    find_stage,
    validate_decoder,
)
from fedsqueeze.codecs.positions import decode_interleaved, encode_interleaved
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan, PlanError

N = 15_010  # the digits MLP
LAYOUT = Layout.of(
    {"w": np.zeros((200, 64)), "b": np.zeros(200), "w2": np.zeros((10, 200)), "b2": np.zeros(10)}
)


def random_ae(stage: Autoencoder, n: int, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    enc = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in stage.encoder_shapes(n).items()}
    dec = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in stage.decoder_shapes(n).items()}
    return enc, dec


def states(chain: Chain, n: int, seed: int = 0) -> tuple[CodecState, CodecState, int]:
    index, stage = find_stage(chain)
    enc, dec = random_ae(stage, n, seed)
    tx, rx = CodecState(), CodecState()
    tx.stage(index).update({**enc, **dec})
    rx.stage(index).update(dec)
    return tx, rx, index


def test_layout_is_the_digits_mlp() -> None:
    assert LAYOUT.numel == N


@pytest.mark.parametrize(
    "chain",
    [
        "ae",
        "ae:variant=chunked,latent=2,chunk=512",
        "ae:hidden=[16],latent=8,bits=4,correction=0.01",
        "ae:what=weights,correction=0",
        "ae:variant=chunked,hidden=[8],latent=2,chunk=256,refine=false",
        "ae:variant=conv,latent=2,stride=64,kernel=128",
        "ae:variant=conv,hidden=[4],latent=2,stride=8,kernel=16,bits=6",
    ],
)
def test_round_trip_keeps_sender_and_receiver_in_sync(chain: str) -> None:
    p = Chain.parse(chain)
    tx, rx, index = states(p, N)
    stage = find_stage(p)[1]
    rng = np.random.default_rng(1)
    sent = np.zeros(N, np.float64)
    got = np.zeros(N, np.float64)
    for _ in range(4):
        x = (rng.standard_normal(N) * 0.01).astype(np.float32)
        enc = p.encode(x, LAYOUT, tx)
        out = p.decode(enc.data, LAYOUT, rx)
        assert np.array_equal(out, enc.reconstruction)  # the receiver decodes exactly what the sender expects
        sent += x
        got += out
    dec_keys = list(stage.decoder_shapes(N))
    assert set(rx.stage(index)) == set(dec_keys)  # no memory on the receiver
    for k in dec_keys:
        assert np.array_equal(tx.stage(index)[k], rx.stage(index)[k])
    if stage.what == "update":
        # Error feedback: what has not arrived yet is exactly the sender's memory.
        np.testing.assert_allclose(tx.stage(index)["memory"], sent - got, atol=1e-5)
    else:
        assert "memory" not in tx.stage(index)
    # The state survives safetensors round trips.
    assert CodecState.from_bytes(rx.to_bytes()).fingerprint() == rx.fingerprint()


def test_default_message_fits_the_500x_budget() -> None:
    p = Chain.parse("ae")
    tx, _, _ = states(p, N)
    fp = p.fingerprint(LAYOUT)
    x = (np.random.default_rng(2).standard_normal(N) * 0.01).astype(np.float32)
    for _ in range(3):
        wire = Payload(data=p.encode(x, LAYOUT, tx).data, fingerprint=fp).wire_size
        assert wire <= LAYOUT.raw_bytes / 500, wire


def test_lstsq_latent_beats_a_bad_encoder_and_never_hurts() -> None:
    p = Chain.parse("ae:correction=0")
    tx, rx, index = states(p, N)
    # x lies in the decoder's span: the least-squares latent recovers it almost exactly.
    rng = np.random.default_rng(3)
    w, b = tx.stage(index)["dec.0.weight"], tx.stage(index)["dec.0.bias"]
    x = (w @ rng.standard_normal(32).astype(np.float32) + b).astype(np.float32)
    enc = p.encode(x, LAYOUT, tx)
    assert enc.stats.nmse < 0.05  # 8-bit latent
    # Orthogonal noise: the scale alpha keeps the error at most ||x||.
    tx2, _, _ = states(p, N, seed=5)
    enc = p.encode(rng.standard_normal(N).astype(np.float32), LAYOUT, tx2)
    assert enc.stats.nmse <= 1.0 + 1e-6


def test_missing_decoder_and_bad_messages_are_codec_errors() -> None:
    p = Chain.parse("ae")
    with pytest.raises(CodecError, match="prepass"):
        p.encode(np.zeros(N, np.float32), LAYOUT, CodecState())
    tx, rx, _ = states(p, N)
    data = p.encode(np.ones(N, np.float32) * 0.01, LAYOUT, tx).data
    with pytest.raises(CodecError, match="prepass"):
        p.decode(data, LAYOUT, CodecState())
    for bad in (data[:-3], data + b"\x00" * 4, data[:5], b"\x01\x07" + bytes(12)):
        with pytest.raises(CodecError):
            p.decode(bad, LAYOUT, rx)


def test_interleaved_rice_positions_round_trip() -> None:
    rng = np.random.default_rng(4)
    for n, k in ((15010, 30), (100, 100), (1000, 1), (5, 0), (1 << 20, 2000), (7, 3)):
        idx = np.sort(rng.choice(n, size=k, replace=False))
        b, bits = encode_interleaved(idx, n)
        for start, pad in (
            (0, np.zeros(0, np.uint8)),
            (5, np.ones(5, np.uint8)),
        ):  # at an offset, with bits after
            stream = np.concatenate([np.zeros(start, np.uint8), bits, pad, np.ones(3, np.uint8)])
            out, end = decode_interleaved(stream, start, k, b, n, "test")
            assert np.array_equal(out, idx) and end == start + len(bits)
    b, bits = encode_interleaved(np.array([3, 8]), 9)
    with pytest.raises(CodecError, match="outside"):
        decode_interleaved(bits, 0, 2, b, 8, "test")  # position 8 outside a model of 8
    with pytest.raises(CodecError, match="truncated"):
        decode_interleaved(bits[:-1], 0, 2, b, 9, "test")
    with pytest.raises(CodecError, match="truncated"):
        decode_interleaved(np.ones(40, np.uint8), 0, 3, 2, 1000, "test")  # no code word ever ends


def test_decoder_validation() -> None:
    stage = Autoencoder(latent=4)
    n = 300
    shapes = stage.decoder_shapes(n)
    _, dec = random_ae(stage, n)
    cap = stage.decoder_nbytes(n) + 4096
    tensors, meta = validate_decoder(decoder_to_bytes(dec, "c0001"), shapes, cap)
    assert meta == {"collaborator_id": "c0001"} and set(tensors) == set(shapes)
    nan = {k: v.copy() for k, v in dec.items()}
    nan["dec.0.weight"][0, 0] = np.nan
    cases = {
        "pickle": pickle.dumps(dec),
        "extra": decoder_to_bytes({**dec, "dec.9.weight": np.zeros(3, np.float32)}),
        "missing": decoder_to_bytes({k: v for k, v in dec.items() if k != "dec.0.bias"}),
        "shape": decoder_to_bytes({**dec, "dec.0.bias": np.zeros(n + 1, np.float32)}),
        "nan": decoder_to_bytes(nan),
        "garbage": b"\xff" * 64,
    }
    for name, blob in cases.items():
        with pytest.raises(CodecError):
            validate_decoder(blob, shapes, cap)
        assert name
    from safetensors.numpy import save

    with pytest.raises(CodecError, match="F32"):
        validate_decoder(save({k: v.astype(np.float64) for k, v in dec.items()}), shapes, 10 * cap)
    with pytest.raises(CodecError, match="size cap"):
        validate_decoder(decoder_to_bytes(dec), shapes, 100)


def test_plan_fills_the_stage_from_prepass_and_checks_consistency() -> None:
    plan = Plan.from_json(
        {"uplink": {"chain": "ae:bits=4"}, "prepass": {"enabled": True, "latent": 16, "correction": 0.001}}
    )
    stage = find_stage(LinkChains.from_plan(plan).uplink)[1]
    assert (stage.latent, stage.bits, stage.correction, stage.what) == (16, 4, 0.001, "update")
    with pytest.raises(PlanError, match="prepass.enabled"):
        Plan.from_json({"uplink": {"chain": "ae"}})
    with pytest.raises(PlanError, match="uplink.target"):
        Plan.from_json({"uplink": {"chain": "ae"}, "prepass": {"enabled": True, "what": "weights"}})
    with pytest.raises(PlanError, match="needs an `ae` stage"):
        Plan.from_json({"prepass": {"enabled": True}})
    with pytest.raises(PlanError, match="decoder"):
        Plan.from_json({"uplink": {"chain": "ae"}, "prepass": {"enabled": True, "decoder": "some"}})
    # Literal paper mode.
    Plan.from_json({"uplink": {"chain": "ae", "target": "weights"},
                    "prepass": {"enabled": True, "what": "weights", "hidden": [256], "correction": 0}})  # fmt: skip


def test_savings_ratio_matches_hand_computed_values() -> None:
    s = sv.Sizes(original=60_000, compressed=100, decoder=1_000_000)
    # eq. 4: 60000 * 20 * 4 / (100 * 20 * 4 + 1e6 * 1) = 4.8e6 / 1.008e6
    assert sv.savings_ratio(s, 20, 4, "shared") == pytest.approx(4.8e6 / 1.008e6)
    # case (b): cost 4e6 -> 4.8e6 / 4.008e6, independent of C
    assert sv.savings_ratio(s, 20, 4, "per_collaborator") == pytest.approx(4.8e6 / 4.008e6)
    assert sv.savings_ratio(s, 20, 40, "per_collaborator") == pytest.approx(
        sv.savings_ratio(s, 20, 4, "per_collaborator")
    )
    # break-even (b): R* = D / (O - S) = 1e6 / 59900 = 16.69 -> 17 rounds
    assert sv.break_even_rounds(s, 4, "per_collaborator") == 17
    assert (
        sv.savings_ratio(s, 17, 4, "per_collaborator") >= 1 > sv.savings_ratio(s, 16, 4, "per_collaborator")
    )
    # break-even (a): C* = D / (R (O - S)) = 1e6 / (5 * 59900) = 3.34 -> 4 collaborators for 5 rounds
    assert sv.break_even_collaborators(s, 5, "shared") == 4
    assert sv.break_even_rounds(s, 4, "shared") == 5  # 1e6 / (4 * 59900) = 4.17
    # With the shared decoder's 3 downloads counted: cost 4e6 as in case (b).
    assert sv.savings_ratio(s, 20, 4, "shared", with_downloads=True) == pytest.approx(4.8e6 / 4.008e6)
    assert sv.break_even_rounds(sv.Sizes(100, 100, 5), 4, "shared") is None


def test_savings_from_a_report() -> None:
    report = {
        "model": {"raw_bytes": 60_040},
        "plan": {"collaborators": {"min": 4}, "prepass": {"decoder": "per_collaborator"}},
        "prepass_bytes": {"decoder": 4 * 1000},
        "prepass": {"decoders": {"a": 1, "b": 1, "c": 1, "d": 1}},
        "rounds": [{"participants": 4, "bytes": {"up_wire": 440, "decoder": 0}}] * 3,
    }
    sizes, ctx = sv.sizes_from_report(report)
    assert sizes == sv.Sizes(60_040, 110, 1000)
    assert ctx["rounds"] == 3 and ctx["messages"] == 12


DECODER_CHAINS = ["bf16 | zstd", "quantize:8,granularity=layer | entropy"]


@pytest.mark.parametrize("config", DECODER_CHAINS)
def test_compressed_decoder_round_trips_smaller_and_still_reconstructs(config: str) -> None:
    from fedsqueeze.codecs.autoencoder import decoder_chain

    stage = Autoencoder(latent=8, correction=0.0)
    n = 2000
    shapes = stage.decoder_shapes(n)
    enc, dec = random_ae(stage, n)
    chain = decoder_chain(config)
    blob = decoder_to_bytes(dec, "c0001", chain)
    raw = decoder_to_bytes(dec, "c0001")
    assert len(blob) < len(raw) / 2
    got, meta = validate_decoder(blob, shapes, len(raw), chain)
    assert meta == {"collaborator_id": "c0001", "chain": str(chain)} and set(got) == set(shapes)
    w, w_hat = dec["dec.0.weight"], got["dec.0.weight"]
    rel = float(np.linalg.norm(w - w_hat) / np.linalg.norm(w))
    assert 0 < rel < 0.02, rel  # rounded, not dropped
    # Updates in the decoder's span: the rounded decoder (sender and receiver both hold what travelled)
    # reconstructs them about as well as the fp32 one (whose error is the 8-bit latent's).
    layout = Layout.of({"x": np.zeros(n)})
    p = Chain.parse("ae:latent=8,correction=0")
    xs = (np.random.default_rng(1).standard_normal((4, 8)) @ w.T).astype(np.float32)
    errors = []
    for decoder in (dec, got):
        tx, rx = CodecState(), CodecState()
        tx.stage(0).update({**enc, **decoder})
        rx.stage(0).update(decoder)
        outs = np.stack([p.decode(p.encode(x, layout, tx).data, layout, rx) for x in xs])
        errors.append(float(np.mean(np.sum((outs - xs) ** 2, axis=1) / np.sum(xs**2, axis=1))))
    assert errors[0] < 0.01 and errors[1] < 1.2 * errors[0], errors


def test_compressed_decoder_uploads_are_checked() -> None:
    from safetensors.numpy import save

    from fedsqueeze.codecs.autoencoder import decoder_chain

    stage = Autoencoder(latent=4)
    n = 300
    shapes = stage.decoder_shapes(n)
    _, dec = random_ae(stage, n)
    chain = decoder_chain("quantize:8,granularity=layer | entropy")
    cap = stage.decoder_nbytes(n) + 4096
    good = decoder_to_bytes(dec, "c0001", chain)
    data = np.frombuffer(
        chain.encode(np.concatenate([v.reshape(-1) for v in dec.values()]), _layout(shapes)).data, np.uint8
    )
    meta = {"collaborator_id": "c0001", "chain": str(chain)}
    nan_chain = decoder_chain("identity")
    flat = np.zeros(sum(int(np.prod(s)) for s in shapes.values()), np.float32)
    nan_payload = bytearray(nan_chain.encode(flat, _layout(shapes)).data)
    nan_payload[-4:] = np.array([np.nan], np.float32).tobytes()
    cases = {
        "raw decoder, compressed plan": (decoder_to_bytes(dec, "c0001"), chain),
        "compressed decoder, raw plan": (good, None),
        "another chain": (decoder_to_bytes(dec, "c0001", decoder_chain("bf16 | zstd")), chain),
        "truncated payload": (save({"payload": data[:-5]}, metadata=meta), chain),
        "extra tensor": (save({"payload": data, "x": np.zeros(2, np.float32)}, metadata=meta), chain),
        "payload not U8": (save({"payload": data.astype(np.float32)}, metadata=meta), chain),
        "NaN": (
            save(
                {"payload": np.frombuffer(bytes(nan_payload), np.uint8)},
                metadata={**meta, "chain": "identity"},
            ),
            nan_chain,
        ),  # fmt: skip
        "pickle": (pickle.dumps(dec), chain),
    }
    for name, (blob, expect) in cases.items():
        with pytest.raises(CodecError):
            validate_decoder(blob, shapes, cap, expect)
        assert name
    with pytest.raises(CodecError, match="size cap"):
        validate_decoder(good, shapes, len(good) - 1, chain)
    # A decoder chain is one stateless message; the plan refuses anything else.
    with pytest.raises(PlanError, match="decoder_chain.*stateful"):
        Plan.from_json(
            {"uplink": {"chain": "ae"}, "prepass": {"enabled": True, "decoder_chain": "ef | topk:0.1"}}
        )
    with pytest.raises(PlanError, match="decoder_chain"):
        Plan.from_json({"uplink": {"chain": "ae"}, "prepass": {"enabled": True, "decoder_chain": "nosuch"}})


def _layout(shapes: dict) -> Layout:
    from fedsqueeze.codecs.autoencoder import decoder_layout

    return decoder_layout(shapes)


def test_savings_as_run_counts_every_decoder_that_travelled() -> None:
    rounds = [{"participants": 4, "bytes": {"up_raw": 4 * 60_040, "up_wire": 440, "decoder": 0}}] * 3
    rounds = [*rounds, {"participants": 4, "bytes": {"up_raw": 4 * 60_040, "up_wire": 440, "decoder": 700}}]
    report = {
        "model": {"raw_bytes": 60_040},
        "plan": {"collaborators": {"min": 4}, "prepass": {"decoder": "per_collaborator"}},
        "prepass_bytes": {"decoder": 4 * 1000},
        "prepass": {"decoders": {"a": 2, "b": 1, "c": 1, "d": 1}},  # a re-trained once, during round 4
        "rounds": rounds,
    }
    run = sv.as_run(report)
    assert (
        run["decoder_uploads"] == 5 and run["decoder_bytes"] == 4700 and run["decoder_bytes_in_rounds"] == 700
    )
    assert run["savings_ratio"] == pytest.approx(16 * 60_040 / (4 * 440 + 4700))
    assert "SR 148.71" in sv.as_run_lines(run)[0]
    assert sv.sizes_from_report(report)[0].decoder == 940  # D for eq. 4's table: the mean upload


def test_conv_variant_matches_torch_and_its_decoder_does_not_grow_with_the_model() -> None:
    import torch

    from fedsqueeze.collaborator.prepass import _convnet, _load

    stage = Autoencoder(variant="conv", hidden=[3], latent=2, stride=4, kernel=10)
    n = 1000  # padded to 1008 = 63 * 4^2
    enc, dec = random_ae(stage, n)
    assert stage.num_chunks(n) == 63 and stage.latent_count(n) == 126
    sizes = stage.sizes(n)
    t_enc = _convnet(sizes, stage.kernel, stage.stride, transpose=False)
    t_dec = _convnet(list(reversed(sizes)), stage.kernel, stage.stride, transpose=True)
    _load(t_enc, "enc", enc)
    _load(t_dec, "dec", dec)
    v = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    z = stage.encode_latent(enc, v)
    with torch.no_grad():
        x = torch.zeros(1, 1, stage.padded_length(n))
        x[0, 0, :n] = torch.from_numpy(v)
        z_torch = t_enc(x)
        np.testing.assert_allclose(z, z_torch.numpy().reshape(-1), rtol=1e-4, atol=1e-5)
        out_torch = t_dec(z_torch).numpy().reshape(-1)[:n]
    np.testing.assert_allclose(stage.decode_latent(dec, z, n), out_torch, rtol=1e-4, atol=1e-5)
    # The decoder's size is the same for a model 100 times larger; dense grows with it.
    assert stage.decoder_nbytes(100 * n) == stage.decoder_nbytes(n) == 4 * (2 * 3 * 10 + 3 + 3 * 1 * 10 + 1)
    assert Autoencoder(latent=2).decoder_nbytes(100 * n) > 50 * Autoencoder(latent=2).decoder_nbytes(n)


def test_conv_lstsq_latent_recovers_updates_in_the_decoders_span() -> None:
    p = Chain.parse("ae:variant=conv,latent=2,stride=32,kernel=64,correction=0")
    tx, _, index = states(p, N)
    stage = find_stage(p)[1]
    z = np.random.default_rng(3).standard_normal(stage.latent_count(N)).astype(np.float32)
    x = stage.decode_latent(tx.stage(index), z, N) - stage.decode_latent(tx.stage(index), 0 * z, N)
    tracemalloc.start()
    try:
        enc = p.encode(x, LAYOUT, tx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert enc.stats.nmse < 0.01, enc.stats.nmse  # only the 8-bit latent's rounding
    # no n x latents matrix: that would be 56 MB here, the solve peaks near 1 MB
    assert peak < N * stage.latent_count(N) * 4 / 10, peak


def test_conv_settings_and_architecture_checks() -> None:
    for bad in ("kernel=16,stride=32", "kernel=33,stride=32", "stride=0", "kernel=100000"):
        with pytest.raises(CodecError):
            Chain.parse(f"ae:variant=conv,{bad}")
    conv = Autoencoder(variant="conv", latent=2, stride=32, kernel=64)
    arch = conv.architecture(N)
    assert arch == {
        "kind": "conv",
        "sizes": {"input": N, "latent": 2, "layers": 0, "kernel": 64, "stride": 32},
    }
    # dense and chunked configs (and fingerprints) do not carry the conv-only settings
    assert "stride" not in Autoencoder().get_config() and conv.get_config()["kernel"] == 64
    from fedsqueeze.aggregator.prepass import Prepass
    from fedsqueeze.errors import InvalidArgument

    plan = Plan.from_json({"uplink": {"chain": "ae"}, "collaborators": {"min": 1},
                           "prepass": {"enabled": True, "variant": "conv", "latent": 2, "stride": 32, "kernel": 64}})  # fmt: skip
    chains = LinkChains.from_plan(plan)
    pre = Prepass(plan.prepass, chains.uplink, LAYOUT)
    pre.enabled = True
    assert pre.expected == {"dec.0.weight": (2, 1, 64), "dec.0.bias": (1,)}
    pre.check_upload("c0", arch)
    for wrong in (
        {**arch["sizes"], "kernel": 128},
        {**arch["sizes"], "stride": 16},
        {k: v for k, v in arch["sizes"].items() if k != "kernel"},
    ):
        with pytest.raises(InvalidArgument):
            pre.check_upload("c0", {"kind": "conv", "sizes": wrong})
    with pytest.raises(InvalidArgument):
        pre.check_upload("c0", {"kind": "dense", "sizes": arch["sizes"]})
    _, dec = random_ae(conv, N)
    with pytest.raises(InvalidArgument):  # a dense decoder's tensors where the plan wants conv kernels
        pre.validate("c0", decoder_to_bytes(random_ae(Autoencoder(latent=2), N)[1], "c0"))
    assert set(pre.validate("c0", decoder_to_bytes(dec, "c0"))) == {"dec.0.weight", "dec.0.bias"}


def test_conv_prepass_trains_in_torch_and_its_compressed_decoder_serves_the_codec() -> None:
    from fedsqueeze.codecs.autoencoder import decoder_chain
    from fedsqueeze.collaborator.prepass import pack_decoder, train_autoencoder

    stage = Autoencoder(variant="conv", latent=2, stride=16, kernel=32, correction=0.0)
    n = 900
    rng = np.random.default_rng(0)
    # Updates that repeat one smooth shape along the vector: what a shift-invariant decoder can learn.
    t = np.arange(n)
    samples = np.stack(
        [np.sin(t / 5.0 + p) * (1 + 0.1 * rng.standard_normal()) for p in rng.uniform(0, 6, 40)]
    )
    samples = (samples / np.sqrt(np.mean(samples**2, axis=1, keepdims=True))).astype(np.float32)
    enc, dec, losses = train_autoencoder(stage, samples, epochs=30, lr=0.01, seed=0)
    assert losses[-1] < 0.1 * losses[0]
    blob, received = pack_decoder(stage, dec, "c0000", "quantize:8,granularity=layer | entropy", n)
    assert len(blob) < len(decoder_to_bytes(dec, "c0000")) and set(received) == set(stage.decoder_shapes(n))
    assert decoder_chain("") is None
    layout = Layout.of({"x": np.zeros(n)})
    p = Chain.from_config([{"id": "ae", **{k: v for k, v in stage.get_config().items() if k != "id"}}])
    tx, rx = CodecState(), CodecState()
    tx.stage(0).update({**enc, **received})
    rx.stage(0).update(received)
    x = samples[3]
    encoded = p.encode(x, layout, tx)
    assert np.array_equal(p.decode(encoded.data, layout, rx), encoded.reconstruction)
    assert encoded.stats.nmse < 0.05, encoded.stats.nmse  # the AE part alone (no correction): 0.013 measured
