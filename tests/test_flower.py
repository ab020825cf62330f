"""fedsqueeze.flower in process: the strategy wrapper and the client mod on Flower's own Message objects.

These need Flower, which lives in its own environment (it requires protobuf<7): `make flower-test`.
"""

from __future__ import annotations

import copy
import io
import os

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
flwr = pytest.importorskip(
    "flwr", reason="Flower is not installed here; `make flower-test` runs these in .venv-flower"
)

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAdam, FedAvg  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedsqueeze.codecs import Chain, CodecState, Layout  # noqa: E402
from fedsqueeze.flower import CompressedStrategy, FlowerCodecError, compression_mod, make_compression_mod  # noqa: E402
from fedsqueeze.flower.records import META, PAYLOAD  # noqa: E402

UPLINK = "ef | topk:0.1 | quantize:8 | entropy"
DOWNLINK = "residual | topk:0.2 | quantize:8 | entropy"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Outside Flower's runtime, messages need a run and node id to be built.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps the replies it was given, as the wrapper handed them over."""

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        self.received = list(replies)
        return super().aggregate_train(server_round, self.received)


class Grid:
    """What FedAvg asks of a Grid when it configures a round: the connected nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def model_record(rng: np.random.Generator, *, extra: bool = False, dtype: type = np.float32) -> ArrayRecord:
    arrays = {"fc.weight": rng.normal(0, 0.1, size=(30, 20)).astype(dtype), "fc.bias": np.zeros(30, dtype)}
    if extra:
        arrays["bn.num_batches_tracked"] = np.array(5, dtype=np.int64)
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def numpy_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class Node:
    """One SuperNode: its context (state kept between messages) and a train function.

    The train function moves every float weight by `step` (a different step per node) and
    remembers the model it was given."""

    def __init__(self, node_id: int, step: float, mod=compression_mod) -> None:  # type: ignore[no-untyped-def]
        self.node_id = node_id
        self.step = step
        self.mod = mod
        self.context = Context(run_id=7, node_id=node_id, node_config={}, state=RecordDict(), run_config={})
        self.seen: dict[str, np.ndarray] | None = None

    def train(self, msg: Message, context: Context) -> Message:
        record = msg.content["arrays"]
        self.seen = numpy_of(record)
        local = {
            k: Array(np.asarray(v + self.step if v.dtype.kind == "f" else v + 1))
            for k, v in self.seen.items()
        }
        content = RecordDict({"arrays": ArrayRecord(local), "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        self.seen = numpy_of(msg.content["arrays"])
        return Message(
            RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "num-examples": 10})}), reply_to=msg
        )

    def handle(self, msg: Message) -> Message:
        fn = self.train if msg.metadata.message_type == "train" else self.evaluate
        return self.mod(msg, self.context, fn)


class Sent:
    """A message as it travelled: the mod and the strategy replace `content` once they have decoded it."""

    def __init__(self, msg: Message) -> None:
        self.node = msg.metadata.dst_node_id if msg.metadata.dst_node_id else msg.metadata.src_node_id
        self.content = msg.content if msg.has_content() else None


def run_round(
    strategy: CompressedStrategy,
    nodes: dict[int, Node],
    arrays: ArrayRecord,
    server_round: int,
    drop: set[int] = frozenset(),
):  # type: ignore[no-untyped-def, assignment]
    """One training round; returns the downlink and uplink messages as they travelled, and the new model."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid(list(nodes))))
    down = [Sent(m) for m in messages]
    replies = [
        nodes[m.metadata.dst_node_id].handle(m) for m in messages if m.metadata.dst_node_id not in drop
    ]
    up = [Sent(r) for r in replies]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    return down, replies, aggregated, up


def test_rounds_decode_to_the_models_sent_and_aggregate_the_nodes_updates() -> None:
    rng = np.random.default_rng(0)
    nodes = {n: Node(n, step) for n, step in ((101, 0.01), (202, 0.02), (303, 0.03))}
    strategy = CompressedStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3),
        uplink=UPLINK,
        downlink=DOWNLINK,
    )
    arrays = model_record(rng)
    layout = Layout.of(numpy_of(arrays))
    # Each link's receivers, replayed outside Flower: what each node and the server must have decoded.
    mirror_down = {n: CodecState() for n in nodes}
    mirror_up = {n: CodecState() for n in nodes}
    down, up_chain = Chain.from_config(DOWNLINK), Chain.from_config(UPLINK)
    for server_round in range(1, 6):
        sent = layout.flatten(numpy_of(arrays))
        messages, replies, aggregated, up = run_round(strategy, nodes, arrays, server_round)
        for msg in messages:
            record = msg.content["arrays"]  # type: ignore[index]
            assert list(record) == [PAYLOAD] and record[PAYLOAD].dtype == "uint8"  # one uint8 array travels
            assert isinstance(msg.content[META], ConfigRecord)  # type: ignore[index]
            node = nodes[msg.node]
            expected = down.decode(record[PAYLOAD].numpy().tobytes(), layout, mirror_down[node.node_id])
            assert node.seen is not None
            np.testing.assert_array_equal(layout.flatten(node.seen), expected)
        updates = []
        for reply, travelled in zip(replies, up, strict=True):
            assert not reply.has_error()
            assert list(travelled.content["arrays"]) == [PAYLOAD]  # type: ignore[index]
            # Decoded back before the wrapped strategy sees it:
            assert list(reply.content["arrays"]) == ["fc.weight", "fc.bias"]
            payload = travelled.content["arrays"][PAYLOAD].numpy().tobytes()  # type: ignore[index]
            updates.append(up_chain.decode(payload, layout, mirror_up[travelled.node]))
        # FedAvg (equal weights) of what the nodes' weights decode to: the model sent plus their updates.
        np.testing.assert_allclose(
            layout.flatten(numpy_of(aggregated)), sent + np.mean(updates, axis=0), atol=1e-6
        )
        # The steps arrive, a top 10 % at a time (error feedback keeps the rest):
        assert float(np.mean(updates)) > 0
        stats = strategy.rounds[server_round]
        assert stats.down.messages == stats.up.messages == 3
        assert stats.up.ratio > 4 and stats.down.ratio > 2
        arrays = aggregated
    # The downlink's error shrinks as the residual catches up: the nodes train on the model.
    assert np.abs(layout.flatten(nodes[101].seen) - sent).max() < 0.05  # type: ignore[arg-type]


def test_reply_bytes_flower_counts_are_the_chains_bytes_plus_the_record_overhead() -> None:
    rng = np.random.default_rng(1)
    nodes = {n: Node(n, 0.01) for n in (1, 2)}
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), uplink=UPLINK, downlink=DOWNLINK)
    messages, _, _, _ = run_round(strategy, nodes, model_record(rng), 1)
    for msg in messages:
        payload = msg.content["arrays"][PAYLOAD]
        assert msg.content["arrays"].count_bytes() == len(payload.data) + len(PAYLOAD)
        assert len(payload.data) - len(payload.numpy().tobytes()) == 128  # NumPy's .npy header, nothing else
    stats = strategy.rounds[1]
    sizes = sum(m.content["arrays"].count_bytes() + m.content[META].count_bytes() for m in messages)
    assert stats.down.compressed == sizes
    assert stats.down.uncompressed == 2 * model_record(rng).count_bytes()


def test_integer_arrays_pass_through_uncompressed() -> None:
    rng = np.random.default_rng(2)
    nodes = {n: Node(n, 0.01) for n in (1, 2)}
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), uplink=UPLINK, downlink=DOWNLINK)
    messages, _, aggregated, up = run_round(strategy, nodes, model_record(rng, extra=True), 1)
    for travelled in messages + up:  # the int64 array travels as it is, beside the payload
        assert list(travelled.content["arrays"]) == [PAYLOAD, "bn.num_batches_tracked"]  # type: ignore[index]
    assert nodes[1].seen is not None and nodes[1].seen["bn.num_batches_tracked"].dtype == np.int64
    assert list(aggregated) == ["fc.weight", "fc.bias", "bn.num_batches_tracked"]
    assert aggregated["bn.num_batches_tracked"].numpy() == 6  # the nodes' own values, averaged by FedAvg


def test_fedadam_float64_models_are_coded_as_float32() -> None:
    rng = np.random.default_rng(2)
    nodes = {n: Node(n, 0.01) for n in (1, 2)}
    strategy = CompressedStrategy(FedAdam(fraction_evaluate=0.0, eta=0.1), uplink=UPLINK, downlink=DOWNLINK)
    arrays = model_record(rng)
    for server_round in (1, 2, 3):
        messages, replies, arrays, _ = run_round(strategy, nodes, arrays, server_round)
        assert not any(r.has_error() for r in replies)
    assert arrays["fc.weight"].dtype == "float64"  # Flower's FedAdam returns float64
    assert nodes[1].seen is not None and nodes[1].seen["fc.weight"].dtype == np.float32
    assert [link.down_seq for link in strategy.links.values()] == [3, 3]  # one link all along
    assert strategy.rounds[3].down.ratio > 8  # against Flower's float64 messages


def test_evaluate_messages_share_the_link() -> None:
    rng = np.random.default_rng(3)
    nodes = {n: Node(n, 0.01) for n in (1, 2)}
    strategy = CompressedStrategy(FedAvg(), uplink=UPLINK, downlink=DOWNLINK)
    arrays = model_record(rng)
    for server_round in (1, 2):
        _, _, arrays, _ = run_round(strategy, nodes, arrays, server_round)
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), Grid(list(nodes))))
        replies = [nodes[m.metadata.dst_node_id].handle(m) for m in messages]
        metrics = strategy.aggregate_evaluate(server_round, replies)
        assert metrics is not None and metrics["accuracy"] == pytest.approx(0.5)
        assert nodes[1].seen is not None and list(nodes[1].seen) == ["fc.weight", "fc.bias"]
    assert all(link.down_seq == 4 and link.up_seq == 2 for link in strategy.links.values())


def test_a_lost_reply_restarts_that_nodes_link() -> None:
    rng = np.random.default_rng(4)
    nodes = {n: Node(n, 0.01) for n in (1, 2, 3)}
    strategy = CompressedStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1), uplink=UPLINK, downlink=DOWNLINK
    )
    arrays = model_record(rng)
    _, _, arrays, _ = run_round(strategy, nodes, arrays, 1)
    _, _, arrays, _ = run_round(strategy, nodes, arrays, 2, drop={2})  # node 2 trained, its reply never came
    messages, replies, arrays, _ = run_round(strategy, nodes, arrays, 3)
    seqs = {m.node: m.content[META]["seq"] for m in messages}  # type: ignore[index]
    assert seqs == {1: 2, 2: 0, 3: 2}  # node 2 starts a new link: the whole model, coded from zero
    assert "layout" in next(m for m in messages if m.node == 2).content[META]  # type: ignore[index]
    assert not any(r.has_error() for r in replies)
    _, replies, _, _ = run_round(strategy, nodes, arrays, 4)
    assert not any(r.has_error() for r in replies)


def test_a_node_out_of_step_answers_an_error_and_the_link_restarts() -> None:
    rng = np.random.default_rng(5)
    nodes = {n: Node(n, 0.01) for n in (1, 2)}
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0), uplink=UPLINK, downlink=DOWNLINK)
    arrays = model_record(rng)
    _, _, arrays, _ = run_round(strategy, nodes, arrays, 1)
    stale = copy.deepcopy(nodes[2].context.state)
    _, _, arrays, _ = run_round(strategy, nodes, arrays, 2)
    nodes[2].context.state = stale  # e.g. a node that lost its last context update
    _, replies, arrays, _ = run_round(strategy, nodes, arrays, 3)
    errors = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
    assert list(errors) == [2] and "out of step" in errors[2] and "decoded 1 downlink" in errors[2]
    assert "fedsqueeze" not in nodes[2].context.state  # the node forgot the link
    messages, replies, _, _ = run_round(strategy, nodes, arrays, 4)
    assert next(m for m in messages if m.node == 2).content[META]["seq"] == 0  # type: ignore[index]
    assert not any(r.has_error() for r in replies)


def test_mismatched_chains_are_refused_by_fingerprint_both_ways() -> None:
    rng = np.random.default_rng(6)
    nodes = {n: Node(n, 0.01) for n in (1, 2)}
    inner = RecordingFedAvg(fraction_evaluate=0.0)
    strategy = CompressedStrategy(inner, uplink=UPLINK, downlink=DOWNLINK)
    arrays = model_record(rng)
    _, _, arrays, _ = run_round(strategy, nodes, arrays, 1)

    # Downlink: the server now codes with another chain than the node's link.
    strategy.downlink = Chain.from_config("residual | topk:0.3 | quantize:8 | entropy")
    _, replies, arrays, _ = run_round(strategy, nodes, arrays, 2)
    assert arrays is None and all(r.has_error() and "downlink fingerprint" in r.error.reason for r in replies)
    arrays = model_record(rng)
    strategy.downlink = Chain.from_config(DOWNLINK)
    _, replies, arrays, _ = run_round(strategy, nodes, arrays, 3)  # both links restart
    assert not any(r.has_error() for r in replies)

    # Uplink: node 1 codes its update with another chain than the server's.
    saved = nodes[1].context.state["fedsqueeze"]
    saved["uplink"] = '[{"id": "fp16"}]'
    run_round(strategy, nodes, arrays, 4)
    errors = {r.metadata.src_node_id: r.error.reason for r in inner.received if r.has_error()}
    assert (
        list(errors) == [1] and "uplink fingerprint" in errors[1] and "another chain or layout" in errors[1]
    )
    assert 1 not in strategy.links


def test_payloads_that_are_not_the_chains_are_refused_without_unpickling() -> None:
    rng = np.random.default_rng(7)
    nodes = {n: Node(n, 0.01) for n in (1,)}
    strategy = CompressedStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        uplink=UPLINK,
        downlink=DOWNLINK,
    )
    arrays = model_record(rng)

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("touch /tmp/fedsqueeze-flower-pwned",))

    buffer = io.BytesIO()
    np.save(buffer, np.array([Evil()], dtype=object), allow_pickle=True)
    pickled = Array(dtype="uint8", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    for tamper in ("pickle", "truncate", "random"):
        messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Grid([1])))
        record = messages[0].content["arrays"]
        data = record[PAYLOAD].numpy().tobytes()
        if tamper == "pickle":
            record[PAYLOAD] = pickled
        elif tamper == "truncate":
            record[PAYLOAD] = Array(np.frombuffer(data[: len(data) // 2], dtype=np.uint8))
        else:
            record[PAYLOAD] = Array(rng.integers(0, 256, size=len(data), dtype=np.uint8))
        reply = nodes[1].handle(messages[0])
        assert reply.has_error() and reply.error.reason.startswith("fedsqueeze:"), tamper
        strategy.aggregate_train(1, [reply])
    assert not os.path.exists("/tmp/fedsqueeze-flower-pwned")


def test_messages_without_fedsqueeze_metadata_pass_through_and_an_uncompressed_reply_is_refused() -> None:
    rng = np.random.default_rng(8)
    node = Node(1, 0.01)
    plain = list(
        FedAvg(min_train_nodes=1, min_available_nodes=1).configure_train(
            1, model_record(rng), ConfigRecord(), Grid([1])
        )
    )
    reply = node.handle(plain[0])
    assert not reply.has_error() and META not in reply.content  # the mod leaves Flower's own messages alone
    np.testing.assert_allclose(reply.content["arrays"]["fc.bias"].numpy(), 0.01)

    # A node without the mod cannot answer a compressed message as if it had decoded it.
    strategy = CompressedStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        uplink=UPLINK,
        downlink=DOWNLINK,
    )
    messages = list(strategy.configure_train(1, model_record(rng), ConfigRecord(), Grid([1])))
    bare = Node(1, 0.0, mod=lambda msg, ctx, call_next: call_next(msg, ctx))
    replies = [bare.handle(messages[0])]
    assert bare.seen is not None and list(bare.seen) == [PAYLOAD]
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is None  # FedAvg got only an error reply


def test_prior_makes_the_first_download_small_and_a_different_initial_model_is_refused() -> None:
    rng = np.random.default_rng(9)
    initial = model_record(rng)
    chain = "residual | lattice:0.01 | entropy"
    plain = CompressedStrategy(FedAvg(fraction_evaluate=0.0), uplink=UPLINK, downlink=chain)
    primed = CompressedStrategy(FedAvg(fraction_evaluate=0.0), uplink=UPLINK, downlink=chain, prior=initial)
    run_round(plain, {n: Node(n, 0.01) for n in (1, 2)}, initial, 1)
    good = {n: Node(n, 0.01, mod=make_compression_mod(prior=lambda ctx: initial)) for n in (1, 2)}
    _, replies, _, _ = run_round(primed, good, initial, 1)
    assert not any(r.has_error() for r in replies)
    # Nothing moved yet: almost nothing travels.
    assert primed.rounds[1].down.payload * 20 < plain.rounds[1].down.payload
    np.testing.assert_array_equal(good[1].seen["fc.weight"], initial["fc.weight"].numpy())  # type: ignore[index]

    other = model_record(np.random.default_rng(10))
    wrong = {1: Node(1, 0.01, mod=make_compression_mod(prior=lambda ctx: other)), 2: Node(2, 0.01)}
    primed = CompressedStrategy(FedAvg(fraction_evaluate=0.0), uplink=UPLINK, downlink=chain, prior=initial)
    _, replies, _, _ = run_round(primed, wrong, initial, 1)
    reasons = {r.metadata.src_node_id: r.error.reason for r in replies}
    assert "initial model" in reasons[1] and "same seed" in reasons[1]
    assert "make_compression_mod(prior=" in reasons[2]
    with pytest.raises(Exception, match="starts with 'residual'"):
        CompressedStrategy(FedAvg(), downlink="topk:0.1", prior=initial)


def test_record_layout_refuses_a_record_with_the_payload_name() -> None:
    record = ArrayRecord({PAYLOAD: Array(np.zeros(3, np.float32))})
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1))
    with pytest.raises(FlowerCodecError, match="already holds an array named"):
        strategy.configure_train(1, record, ConfigRecord(), Grid([1]))
