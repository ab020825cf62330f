"""The example app on Flower's own deployment runtime: a SuperLink and 3 SuperNodes as processes on loopback.

The same app runs twice in one federation: uncompressed (`compress = false`: Flower's own messages,
which the mod passes through untouched), then with `CompressedStrategy` and `compression_mod` and
fedsqueeze's default chains. The bytes checked are Flower's own measures: `message_size_mod` on the
SuperNodes (first in the ClientApp's mods, so it sees the messages as they travel) and the
SuperLink's traffic accounting of each run (`flwr ls --format json`). Needs the Flower environment:
`make flower-test`.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
pytest.importorskip(
    "flwr", reason="Flower is not installed here; `make flower-test` runs these in .venv-flower"
)

from bench.flower_app import LocalFederation  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

NODES = 3
RAW = 15_010 * 4  # the example's MLP as float32


def test_example_learns_and_flowers_own_byte_counts_fall_by_the_chains_ratio(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with LocalFederation(NODES, tmp_path) as federation:
        plain = federation.run({"num-server-rounds": 2, "compress": False})
        squeezed = federation.run({"num-server-rounds": 6, "compress": True})

    # The model learns through both compressed links (the ServerApp's evaluation on held-out digits).
    assert squeezed.accuracy(0) < 0.2
    assert squeezed.accuracy() >= 0.85, squeezed.report["accuracy"]

    # message_size_mod saw every message: one download and one upload per node and round.
    assert len(plain.incoming) == len(plain.outgoing) == 2 * NODES
    assert len(squeezed.incoming) == len(squeezed.outgoing) == 6 * NODES
    # Uncompressed, Flower's messages are the model's float32 bytes plus a little (NumPy headers, config).
    assert all(RAW < size < RAW + 1_000 for size in plain.incoming + plain.outgoing)

    # What Flower measures is what the strategy says it sent: its compressed records, plus the
    # records both runs share (the strategy's ConfigRecord; the app's MetricRecord), byte for byte.
    rounds = squeezed.report["bytes"].values()
    down = {
        k: sum(r["down"][k] for r in rounds) for k in ("messages", "uncompressed", "compressed", "payload")
    }
    up = {k: sum(r["up"][k] for r in rounds) for k in ("messages", "uncompressed", "compressed", "payload")}
    assert down["messages"] == up["messages"] == 6 * NODES
    other_down = plain.incoming[0] - down["uncompressed"] // down["messages"]
    other_up = plain.outgoing[0] - up["uncompressed"] // up["messages"]
    assert sum(squeezed.incoming) == down["compressed"] + other_down * down["messages"]
    assert sum(squeezed.outgoing) == up["compressed"] + other_up * up["messages"]

    # So Flower's own per-message bytes fall by the chain's ratio as carried in Flower's records
    # (codec bytes + NumPy's 128-byte header + the link's metadata), to within the shared records.
    flower_down = (
        sum(plain.incoming) / len(plain.incoming) / (sum(squeezed.incoming) / len(squeezed.incoming))
    )
    flower_up = sum(plain.outgoing) / len(plain.outgoing) / (sum(squeezed.outgoing) / len(squeezed.outgoing))
    chain_down = down["uncompressed"] / down["compressed"]
    chain_up = up["uncompressed"] / up["compressed"]
    print(
        f"\ndownlink: Flower measures {flower_down:.1f}x, the chain {chain_down:.1f}x in records, {down['uncompressed'] / down['payload']:.1f}x in codec bytes"
    )
    print(
        f"uplink: Flower measures {flower_up:.1f}x, the chain {chain_up:.1f}x in records, {up['uncompressed'] / up['payload']:.1f}x in codec bytes"
    )
    assert 0.9 * chain_down <= flower_down <= chain_down * 1.001
    assert 0.8 * chain_up <= flower_up <= chain_up * 1.001
    assert flower_down > 30 and flower_up > 100  # fedsqueeze's default chains on this 15k-parameter model

    # The SuperLink's traffic accounting: the bytes really stay off the wire, both ways.
    for direction, plain_msgs, squeezed_msgs in (
        ("outbound-bytes", plain.incoming, squeezed.incoming),
        ("inbound-bytes", plain.outgoing, squeezed.outgoing),
    ):
        plain_round = plain.traffic[direction] / plain.rounds
        squeezed_round = squeezed.traffic[direction] / squeezed.rounds
        print(
            f"SuperLink {direction} per round: {plain_round:,.0f} uncompressed, {squeezed_round:,.0f} compressed"
        )
        assert plain.traffic[direction] >= sum(plain_msgs) and squeezed.traffic[direction] >= sum(
            squeezed_msgs
        )
        assert plain_round - squeezed_round >= 0.95 * (
            sum(plain_msgs) / plain.rounds - sum(squeezed_msgs) / squeezed.rounds
        )
        assert squeezed_round * 10 < plain_round
