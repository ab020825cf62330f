"""The aggregator's links: a stateful downlink is encoded once per round for members in the same state."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from fedsqueeze.aggregator import checkpoint
from fedsqueeze.aggregator.links import Links
from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import Chain, CodecState, Layout
from fedsqueeze.metrics import Metrics
from fedsqueeze.plan import Plan

DOWN = "residual | lattice:0.1,positions=context | entropy"


def make_links(n: int) -> tuple[Links, LinkChains, Layout, np.ndarray]:
    plan = Plan.from_json({"downlink": {"chain": DOWN, "prior": "initial"}})
    chains = LinkChains.from_plan(plan)
    layout = Layout.of({"w": np.zeros((40, 25)), "b": np.zeros(40)})
    initial = np.random.default_rng(0).standard_normal(layout.numel).astype(np.float32)
    links = Links(chains, layout, initial, Metrics("aggregator"))
    for i in range(n):
        links.add(f"m{i}")
    return links, chains, layout, initial


class CountingChain(Chain):
    """The plan's downlink, counting its encodes."""

    def __init__(self, config: list[dict[str, object]]) -> None:
        super().__init__(Chain.from_config(config).stages)
        self.encodes = 0

    def encode(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.encodes += 1
        return super().encode(*args, **kwargs)


def counted_links(n: int) -> tuple[Links, CountingChain, dict[str, CodecState], np.ndarray]:
    """Links for n members whose downlink counts its encodes, and each member's receiving state."""
    links, chains, _, initial = make_links(n)
    counting = CountingChain(chains.downlink.get_config())
    links.chains = LinkChains(chains.uplink, counting, None, True)
    return links, counting, {f"m{i}": chains.downlink_state(initial) for i in range(n)}, initial


def hand_out(links: Links, members: Iterable[str], round_number: int, model: np.ndarray) -> dict[str, bytes]:
    """Each member's committed download of `model` for the round."""
    payloads = {}
    for member in members:
        download = links.encode_download(member, round_number, model)
        download.commit()
        payloads[member] = download.payload.data
    return payloads


def test_members_in_the_same_state_share_one_encode_and_each_decodes_it() -> None:
    links, counting, receivers, initial = counted_links(3)
    chains, layout = links.chains, links.layout
    rng = np.random.default_rng(1)
    model = initial
    for round_number in (1, 2, 3):
        model = model + 0.05 * rng.standard_normal(model.size).astype(np.float32)
        before = counting.encodes
        payloads = hand_out(links, receivers, round_number, model)
        assert counting.encodes == before + 1  # one encode for all three
        assert len(set(payloads.values())) == 1
        for member, state in receivers.items():  # each collaborator decodes with its own state
            decoded = chains.downlink.decode(payloads[member], layout, state)
            assert np.abs(decoded - model).max() < 0.2


def test_a_member_that_missed_a_round_gets_its_own_encode() -> None:
    links, counting, receivers, initial = counted_links(3)
    chains, layout = links.chains, links.layout
    rng = np.random.default_rng(2)
    first = initial + 0.05 * rng.standard_normal(initial.size).astype(np.float32)
    for member, data in hand_out(links, ("m0", "m1"), 1, first).items():  # m2 is not selected in round 1
        chains.downlink.decode(data, layout, receivers[member])
    second = first + 0.05 * rng.standard_normal(initial.size).astype(np.float32)
    before = counting.encodes
    payloads = hand_out(links, receivers, 2, second)
    assert counting.encodes == before + 2  # m0 and m1 share one, m2 (a round behind) has its own
    assert payloads["m0"] == payloads["m1"] != payloads["m2"]
    for member, state in receivers.items():
        decoded = chains.downlink.decode(payloads[member], layout, state)
        assert np.abs(decoded - second).max() < 0.2


def test_members_restored_from_a_checkpoint_in_the_same_state_share_encodes_again(tmp_path: Path) -> None:
    links, counting, receivers, initial = counted_links(3)
    chains, layout = links.chains, links.layout
    rng = np.random.default_rng(3)
    first = initial + 0.05 * rng.standard_normal(initial.size).astype(np.float32)
    for member, data in hand_out(links, ("m0", "m1"), 1, first).items():  # m2 is a round behind
        chains.downlink.decode(data, layout, receivers[member])
    states = links.states(receivers)
    assert states["m0"][1] is states["m1"][1] != states["m2"][1]  # equal states serialized once
    members = {"members": [{"id": m, "active": True} for m in receivers], "joined": 3}
    checkpoint.save(tmp_path, checkpoint.Checkpoint(1, "plan", first, states, members), layout)
    stored = [k for k in load_file(tmp_path / checkpoint.FILENAME) if k.startswith("state/")]
    assert len(stored) == 3  # the (empty) uplink states, m0's and m1's downlink state, m2's
    loaded = checkpoint.load(tmp_path, "plan", layout)
    assert loaded is not None and loaded.states == states
    restored, restored_counting, _, _ = counted_links(0)
    restored.restore(loaded.states)
    second = first + 0.05 * rng.standard_normal(initial.size).astype(np.float32)
    payloads = hand_out(restored, receivers, 2, second)
    assert restored_counting.encodes == 2  # m0 and m1 (equal states) share one, m2 has its own
    assert payloads["m0"] == payloads["m1"] != payloads["m2"]
    for member, state in receivers.items():
        decoded = chains.downlink.decode(payloads[member], layout, state)
        assert np.abs(decoded - second).max() < 0.2


def test_an_uncommitted_download_leaves_the_state_alone() -> None:
    links, chains, layout, initial = make_links(2)
    model = initial + 0.1
    links.encode_download("m0", 1, model)  # handed out to nobody: not committed
    receiver = chains.downlink_state(initial)
    download = links.encode_download("m0", 1, model)
    download.commit()
    decoded = chains.downlink.decode(download.payload.data, layout, receiver)
    assert np.abs(decoded - model).max() < 0.2


def test_state_identity_matches_forks_only_and_keeps_nothing_alive() -> None:
    state = CodecState()
    state.stage(0)["history"] = np.zeros(4, np.float32)
    identity = state.identity()
    assert identity.same_arrays(state.fork().identity())
    moved = state.fork()
    moved.stage(0)["history"] = np.ones(4, np.float32)
    assert not identity.same_arrays(moved.identity())
    array = weakref.ref(state.stage(0)["history"])
    del state
    gc.collect()
    assert array() is None  # the identity held only weak references
    assert not any(ref() is not None for ref in identity.refs)


def test_the_round_cache_frees_the_states_members_moved_past() -> None:
    links, _, _, initial = make_links(2)
    model = initial + 0.1
    hand_out(links, ("m0", "m1"), 1, model)
    after_round_1 = weakref.ref(links.link("m0").down.stage(0)["history"])
    hand_out(links, ("m0", "m1"), 2, model + 0.1)
    gc.collect()
    assert after_round_1() is None
