"""Reliability in-process: quorum and retries, idempotent updates, checkpoints, robust aggregation.

The federations here run `Federation.run` in a thread and drive the collaborators (the
collaborator's own RoundStep) from the test thread, calling the Federation's methods directly
(what the servicer calls), which is fast and deterministic; tests/test_faults.py does the same with
real processes and kill -9.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedsqueeze.aggregator.checkpoint import FILENAME, CheckpointError
from fedsqueeze.aggregator.federation import Federation
from fedsqueeze.aggregator.strategy import CoordinateMedian, FedAvg, TrimmedMean, build_strategy
from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import CodecState
from fedsqueeze.collaborator.round_step import BuiltinTrainer, LinkStates, RoundStep
from fedsqueeze.errors import AlreadyExists, FailedPrecondition, Unauthenticated
from fedsqueeze.models import build_model, get_flat
from fedsqueeze.payload import Payload
from fedsqueeze.plan import Plan, PlanError
from fedsqueeze.tasks import load_plan_dataset, partition
from fedsqueeze.wire import payload_to_bytes


def make_plan(**over) -> Plan:
    base = {"rounds": 3, "collaborators": {"min": 2, "join_timeout_s": 30}, "round_timeout_s": 30,
            "training": {"local_epochs": 1, "lr": 0.1, "momentum": 0.0}}  # fmt: skip
    base.update(over)
    return Plan.from_json(base)


class Scaled:
    """A trainer whose update is multiplied by `factor`, and which may lie about its sample count (a Byzantine collaborator)."""

    def __init__(self, inner: BuiltinTrainer, factor: float, declared: int | None = None) -> None:
        self.inner, self.factor, self.declared = inner, factor, declared

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples if self.declared is None else self.declared

    def train(self, weights: np.ndarray, round_number: int) -> tuple[np.ndarray, dict[str, float]]:
        local, metrics = self.inner.train(weights, round_number)
        return weights + (local - weights) * np.float32(self.factor), metrics


class Sim:
    """Collaborators of one in-process federation, each running the collaborator's RoundStep."""

    def __init__(
        self,
        fed: Federation,
        n: int,
        scale: dict[int, float] | None = None,
        declared: dict[int, int] | None = None,
    ) -> None:
        self.fed, self.plan = fed, fed.plan
        data = load_plan_dataset(self.plan)
        shards = partition(data.y_train, self.plan.num_shards, "iid", 0.5, self.plan.seed)
        model = build_model(self.plan.model.name, data.input_shape, data.num_classes, {}, self.plan.seed)
        chains = LinkChains.from_plan(self.plan)
        initial = get_flat(model)
        self.members = [fed.join(f"sim{i}", 0) for i in range(n)]
        self.steps: list[RoundStep] = []
        for i, m in enumerate(self.members):
            idx = shards[m.shard_index]
            trainer = Scaled(BuiltinTrainer(self.plan, model, data.x_train[idx], data.y_train[idx], m.shard_index), (scale or {}).get(i, 1.0),
                             (declared or {}).get(i))  # fmt: skip
            states = LinkStates(up=CodecState(), down=chains.downlink_state(initial))
            self.steps.append(RoundStep(self.plan, chains, fed.layout, trainer, states, self._submitter(i)))

    def _submitter(self, i: int):  # the federation may be replaced (a restart): look it up at each call
        def submit(
            round_number: int, num_samples: int, payload: Payload, metrics: dict[str, float], evaluation=None
        ) -> int:
            m = self.members[i]
            return self.fed.submit_update(
                m.collaborator_id,
                m.token,
                round_number,
                num_samples,
                payload,
                payload.wire_size,
                metrics,
                evaluation,
            )

        return submit

    def encode(self, i: int, task) -> tuple[Payload, int]:
        """The update collaborator i would submit for `task`, not submitted."""
        step = self.steps[i]
        caught: list[Payload] = []
        capture = RoundStep(step.plan, step.chains, step.layout, step.trainer, step.states,
                            lambda r, n, p, m, e: caught.append(p) or p.wire_size)  # fmt: skip
        capture.run(task)
        return caught[0], step.trainer.num_samples

    def step(self, i: int, wait_s: float = 0.05) -> str:
        m = self.members[i]
        task = self.fed.get_task(m.collaborator_id, m.token, wait_s)
        if task.kind == "TRAIN":
            self.steps[i].run(task)
        return task.kind


def start_federation(
    fed: Federation, n: int, scale=None, declared=None
) -> tuple[Sim, threading.Event, threading.Thread]:
    """`fed` running in a thread, with n collaborators joined that the test drives (`sim.step`)."""
    stop = threading.Event()
    thread = threading.Thread(target=fed.run, args=(stop,), daemon=True)
    sim = Sim(fed, n, scale, declared)
    thread.start()
    return sim, stop, thread


def run_federation(
    fed: Federation, n: int, *, scale=None, declared=None, alive=None, timeout: float = 120.0
) -> Sim:
    sim, stop, t = start_federation(fed, n, scale, declared)
    alive = set(range(n)) if alive is None else alive
    end = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < end:
        kinds = [sim.step(i) for i in sorted(alive)]
        if all(k == "DONE" for k in kinds):
            break
    stop.set()
    t.join(10)
    assert not t.is_alive()
    return sim


def test_plan_reliability_fields() -> None:
    plan = make_plan(quorum=2, round_retries=1, aggregation={"clip_norm": 5, "robust": "median"})
    assert plan.aggregation.clip_norm == 5.0 and plan.quorum == 2
    assert Plan.from_json(plan.to_json()).sha256 == plan.sha256
    for bad, msg in [({"quorum": 0}, "quorum"), ({"aggregation": {"robust": "mean"}}, "aggregation.robust"),
                     ({"aggregation": {"clip_norm": -1}}, "clip_norm"), ({"aggregation": {"trim_fraction": 0.5}}, "trim_fraction")]:  # fmt: skip
        with pytest.raises(PlanError, match=msg):
            make_plan(**bad)


def test_robust_strategies_and_clipping() -> None:
    g = np.zeros(4, np.float32)
    ups = [
        np.array([1, 1, 1, 1], np.float32),
        np.array([2, 2, 2, 2], np.float32),
        np.array([300, -300, 3, 3], np.float32),
    ]
    med = CoordinateMedian()
    med.begin(g)
    for u in ups:
        med.accumulate(u, 10.0)
    assert med.count == 3 and np.allclose(med.finish(), [2, 1, 2, 2])
    tm = TrimmedMean(trim_fraction=0.34)
    tm.begin(g)
    for u in ups:
        tm.accumulate(u, 1.0)
    assert np.allclose(tm.finish(), [2, 1, 2, 2])
    avg = FedAvg(clip_norm=2.0)
    avg.begin(g)
    avg.accumulate(np.array([30, 40, 0, 0], np.float32), 1.0)  # norm 50 -> clipped to 2
    assert avg.clipped == 1 and np.allclose(avg.finish(), [1.2, 1.6, 0, 0])
    # weights: the delta from the global model is clipped
    w = build_strategy("weights", clip_norm=1.0, robust="median")
    w.begin(np.ones(2, np.float32))
    w.accumulate(np.array([11, 1], np.float32), 1.0)
    assert np.allclose(w.finish(), [2, 1])


def test_duplicates_stale_rounds_and_other_ids_are_refused() -> None:
    fed = Federation(make_plan(rounds=2, collaborators={"min": 2}))
    stop = threading.Event()
    t = threading.Thread(target=fed.run, args=(stop,), daemon=True)
    sim = Sim(fed, 2)
    t.start()
    a, b = sim.members
    task = fed.get_task(a.collaborator_id, a.token, 10)
    assert task.kind == "TRAIN" and task.round == 1
    payload, n = sim.encode(0, task)
    wire = payload.wire_size
    with pytest.raises(Unauthenticated):  # b's id with a's token: cannot submit for another id
        fed.submit_update(b.collaborator_id, a.token, 1, n, payload, wire)
    with pytest.raises(Unauthenticated):
        fed.submit_update(a.collaborator_id, "", 1, n, payload, wire)
    with pytest.raises(FailedPrecondition, match="round 2"):
        fed.submit_update(a.collaborator_id, a.token, 2, n, payload, wire)
    assert (
        fed.submit_update(a.collaborator_id, a.token, 1, n, payload, wire)
        == wire
        == len(payload_to_bytes(payload))
    )
    with pytest.raises(AlreadyExists):  # a resend of an accepted update
        fed.submit_update(a.collaborator_id, a.token, 1, n, payload, wire)
    assert sim.step(1, 10) == "TRAIN"  # b completes round 1
    task = fed.get_task(a.collaborator_id, a.token, 10)
    assert task.round == 2
    with pytest.raises(AlreadyExists):  # still recognised after its round closed
        fed.submit_update(a.collaborator_id, a.token, 1, n, payload, wire)
    fed.leave(b.collaborator_id, b.token)
    with pytest.raises(FailedPrecondition, match="left"):
        fed.get_task(b.collaborator_id, b.token, 0)
    stop.set()
    t.join(10)


def test_quorum_retry_then_failure_are_reported() -> None:
    # Two of three collaborators never answer: quorum 2 is missed, retried once, then the round fails.
    fed = Federation(
        make_plan(rounds=2, collaborators={"min": 3}, quorum=2, round_retries=1, round_timeout_s=0.6)
    )
    sim = run_federation(fed, 3, alive={0}, timeout=30)
    rounds = fed.report.rounds
    assert [r.status.split(":")[0] for r in rounds] == ["failed", "failed"]
    assert (
        rounds[0].attempts == 2
        and rounds[0].participants == 1
        and "quorum not met (1 of 2" in rounds[0].status
    )
    assert fed.report.summary()["final_accuracy"] is None
    # The silent ones were marked lost after round 1: round 2 selects only the live one (then tops up, in vain).
    silent = sim.fed.membership.members[sim.members[1].collaborator_id]
    assert not silent.active or silent.lost


def test_quorum_met_after_a_retry() -> None:
    # Collaborator 1 only comes back during the retry window: status "retried".
    fed = Federation(
        make_plan(rounds=1, collaborators={"min": 2}, quorum=2, round_retries=2, round_timeout_s=0.5)
    )
    stop = threading.Event()
    t = threading.Thread(target=fed.run, args=(stop,), daemon=True)
    sim = Sim(fed, 2)
    t.start()
    assert sim.step(0, 10) == "TRAIN"
    time.sleep(0.7)  # round 1 misses its first deadline
    while sim.step(1, 1) != "TRAIN":
        pass
    t.join(20)
    (r,) = fed.report.rounds
    assert r.status == "retried" and r.attempts >= 2 and r.participants == 2


@pytest.mark.parametrize(
    "downlink, aggregation",
    [
        ({"chain": "residual | fp16"}, {}),
        ({"chain": "residual | lattice:0.0005 | entropy", "update_chain": "ef | topk:0.05"}, {}),
        (
            {"chain": "residual | topk:0.2 | quantize:8 | entropy", "prior": "initial"},
            {"server_optimizer": {"name": "adam", "lr": 0.01}},
        ),
    ],
    ids=["residual", "server-update-chain", "fedadam-prior"],
)
def test_checkpoint_resume_matches_uninterrupted_and_refuses_another_plan(
    tmp_path: Path, downlink: dict, aggregation: dict
) -> None:
    # Stateful chains on both links (and the aggregator's own error feedback of the global update,
    # and the server optimizer's moments): the resumed run only matches if every state survives.
    plan = make_plan(rounds=4, uplink={"chain": "ef | topk:0.1"}, downlink=downlink, aggregation=aggregation)
    ref = Federation(plan)
    run_federation(ref, 2)
    first = Federation(plan, state_dir=tmp_path)
    sim, stop, th = start_federation(first, 2)
    while len(first.report.rounds) < 2:
        sim.step(0)
        sim.step(1)
    stop.set()  # "crash": the round open now is not recorded; a restart re-runs it
    th.join(10)
    ckpt = tmp_path / FILENAME
    assert ckpt.exists() and ckpt.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.tmp"))
    resumed = Federation(plan, state_dir=tmp_path)
    assert resumed.resumed_from == 2 and [r.round for r in resumed.report.rounds] == [1, 2]
    assert "initial_accuracy" in resumed.report.extra
    # Same ids and tokens: the collaborators just carry on (sim.step restores its pre-round states).
    sim.fed = resumed
    stop = threading.Event()
    th = threading.Thread(target=resumed.run, args=(stop,), daemon=True)
    th.start()
    end = time.monotonic() + 60
    while th.is_alive() and time.monotonic() < end:
        sim.step(0)
        sim.step(1)
    th.join(10)
    assert [r.round for r in resumed.report.rounds] == [1, 2, 3, 4]
    assert all(r.status == "ok" for r in resumed.report.rounds)
    assert resumed.report.summary()["final_accuracy"] == pytest.approx(
        ref.report.summary()["final_accuracy"], abs=0.005
    )
    assert np.array_equal(resumed.global_model, ref.global_model)
    with pytest.raises(CheckpointError, match="belongs to plan"):
        Federation(make_plan(rounds=5), state_dir=tmp_path)


def test_a_checkpoint_written_after_a_member_left_resumes(tmp_path: Path) -> None:
    plan = make_plan(rounds=4, downlink={"chain": "residual | fp16", "prior": "initial"})
    first = Federation(plan, state_dir=tmp_path)
    sim, stop, th = start_federation(first, 3)
    while len(first.report.rounds) < 1:
        for i in range(3):
            sim.step(i)
    gone = sim.members[2]
    first.leave(gone.collaborator_id, gone.token)  # its codec states are freed: the checkpoint has none
    while len(first.report.rounds) < 2:
        sim.step(0)
        sim.step(1)
    stop.set()
    th.join(10)
    resumed = Federation(plan, state_dir=tmp_path)
    assert resumed.resumed_from == 2
    assert not resumed.membership.members[gone.collaborator_id].active
    assert not resumed.links.has(gone.collaborator_id)
    assert all(resumed.links.has(m.collaborator_id) for m in sim.members[:2])


BYZANTINE = {"rounds": 6, "collaborators": {"min": 5}, "training": {"local_epochs": 1, "lr": 0.1, "momentum": 0.0},
             "uplink": {"chain": "identity"}, "downlink": {"chain": "identity"}}  # fmt: skip


def final_accuracy(aggregation: dict | None = None, **attack: dict) -> float:
    fed = Federation(make_plan(**BYZANTINE, aggregation=aggregation or {}))
    run_federation(fed, 5, **attack)
    return float(fed.report.summary()["final_accuracy"])


def test_one_wild_update_is_harmless_by_default_and_ruins_unbounded_fedavg() -> None:
    """One collaborator of five sends its delta x 1e6. Plain FedAvg (norm_bound off) is wrecked; the default
    norm bound scales the round's most influential update to 5x the others' median norm, and the median
    rule ignores it."""
    honest = final_accuracy()
    wild = {"scale": {2: 1e6}}
    unbounded = final_accuracy({"norm_bound": None}, **wild)
    bounded = final_accuracy({}, **wild)
    median = final_accuracy({"robust": "median"}, **wild)
    print(
        f"\ndelta x 1e6: honest {honest:.3f}, unbounded FedAvg {unbounded:.3f}, default {bounded:.3f}, median {median:.3f}"
    )
    assert unbounded < honest - 0.2
    assert bounded >= honest - 0.03 and median >= honest - 0.03


def test_a_lied_sample_count_is_capped_at_the_assigned_shard() -> None:
    """One collaborator of five declares 1e9 samples with an honest-sized update that pulls the wrong way:
    its weight is capped at the size of the shard the aggregator gave it, so it is one voice of five."""
    honest = final_accuracy()
    liar = {"scale": {2: -1.0}, "declared": {2: 10**9}}
    capped = final_accuracy({}, **liar)
    fed = Federation(make_plan(**BYZANTINE))
    assert fed.shard_sizes is not None and max(fed.shard_sizes) < 10**4
    print(f"\n1e9 declared samples: honest {honest:.3f}, capped {capped:.3f}")
    assert capped >= honest - 0.05


def test_trimmed_mean_says_when_it_trims_nothing() -> None:
    fed = Federation(make_plan(rounds=1, collaborators={"min": 3}, aggregation={"robust": "trimmed_mean"}))
    run_federation(fed, 3)
    (record,) = fed.report.rounds
    # 0.1 of 3 updates is none: a plain mean, and the record says so
    assert record.aggregation["trimmed_per_side"] == 0


def test_re_sent_downloads_are_counted_apart_and_capped() -> None:
    """A participant that asks for its round's model again gets the same bytes, counted as re-sends, not as
    the round's traffic; past MAX_RESENDS it is refused."""
    from fedsqueeze.aggregator.federation import MAX_RESENDS
    from fedsqueeze.errors import ResourceExhausted

    fed = Federation(make_plan(rounds=1, collaborators={"min": 2}))
    stop = threading.Event()
    t = threading.Thread(target=fed.run, args=(stop,), daemon=True)
    sim = Sim(fed, 2)
    t.start()
    a = sim.members[0]
    first = fed.get_task(a.collaborator_id, a.token, 10)
    again = [fed.get_task(a.collaborator_id, a.token, 1) for _ in range(MAX_RESENDS)]
    assert all(task.model == first.model for task in again)
    with pytest.raises(ResourceExhausted, match="times"):
        fed.get_task(a.collaborator_id, a.token, 1)
    sim.steps[0].run(first)
    assert sim.step(1, 10) == "TRAIN"
    t.join(30)
    (record,) = fed.report.rounds
    wire = first.model.wire_size
    assert record.resent == {"messages": MAX_RESENDS, "wire": MAX_RESENDS * wire}
    assert record.bytes["down_raw"] == 2 * fed.layout.raw_bytes  # one download per participant
    stop.set()
