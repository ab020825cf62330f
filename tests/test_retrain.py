"""Dynamic re-training (seed 001 4.2): a collaborator's AE drifts, it re-trains and re-uploads its decoder."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import Chain, CodecState, Layout
from fedsqueeze.codecs.autoencoder import AE_NMSE, decoder_chain, find_stage, validate_decoder
from fedsqueeze.collaborator.prepass import DriftMonitor, PrepassContext, pack_decoder, train_autoencoder
from fedsqueeze.collaborator.round_step import Download, LinkStates, RoundStep
from fedsqueeze.errors import FailedPrecondition
from fedsqueeze.plan import Plan, PlanError

CHUNK, LATENT, N = 256, 4, 2048
LAYOUT = Layout.of({"w": np.zeros(N)})
DECODER_CHAIN = "quantize:8,granularity=layer | entropy"


def plan(**prepass) -> Plan:
    return Plan.from_json({
        "uplink": {"chain": "ae", "target": "delta"},
        "prepass": {"enabled": True, "variant": "chunked", "chunk": CHUNK, "latent": LATENT, "correction": 0.0,
                    "ae_epochs": 200, "ae_lr": 0.01, "decoder_chain": DECODER_CHAIN, "allow_retrain": True,
                    "retrain_window": 2, "retrain_updates": 2, **prepass},
    })  # fmt: skip


def updates(basis: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Updates whose every chunk lies (up to 1 % noise) in the span of `basis` (CHUNK x LATENT)."""
    coef = rng.standard_normal((count, N // CHUNK, LATENT))
    rows = coef @ basis.T + 0.01 * rng.standard_normal((count, N // CHUNK, CHUNK))
    return rows.reshape(count, N).astype(np.float32)


def drift_setup(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the prepass's subspace, the one updates drift to, 20 prepass updates of unit RMS in the first)."""
    old, new = (np.linalg.qr(rng.standard_normal((CHUNK, LATENT)))[0] for _ in range(2))
    prepass = updates(old, 20, rng)
    prepass /= np.sqrt(np.mean(prepass**2, axis=1, keepdims=True))
    return old, new, prepass


def test_plan_checks_the_retraining_keys() -> None:
    assert plan().prepass.retrain_nmse is None  # the default: never re-train
    with pytest.raises(PlanError, match="allow_retrain"):
        plan(retrain_nmse=0.5, allow_retrain=False)
    with pytest.raises(PlanError, match="per_collaborator"):
        plan(retrain_nmse=0.5, decoder="shared")
    with pytest.raises(PlanError, match="max_retrains"):
        plan(retrain_nmse=0.5, max_retrains=0)


def test_the_ae_stage_leaves_its_ae_parts_nmse_in_the_senders_state() -> None:
    chain = Chain.parse(f"ae:variant=chunked,chunk={CHUNK},latent={LATENT},correction=0")
    index, stage = find_stage(chain)
    rng = np.random.default_rng(0)
    dec = {k: rng.standard_normal(s).astype(np.float32) for k, s in stage.decoder_shapes(N).items()}
    enc = {k: rng.standard_normal(s).astype(np.float32) for k, s in stage.encoder_shapes(N).items()}
    tx, rx = CodecState(), CodecState()
    tx.stage(index).update({**enc, **dec})
    rx.stage(index).update(dec)
    x = rng.standard_normal(N).astype(np.float32)
    encoded = chain.encode(
        x, LAYOUT, tx
    )  # first message: no memory, no correction, so stage NMSE = chain NMSE
    assert float(tx.stage(index)[AE_NMSE][0]) == pytest.approx(encoded.stats.nmse, rel=1e-4)
    assert 0 < encoded.stats.nmse < 1
    chain.decode(encoded.data, LAYOUT, rx)
    assert AE_NMSE not in rx.stage(index)  # a sender-side measurement


class Collaborator:
    """One collaborator's RoundStep and prepass context; uploads land in `uploads` (the aggregator's rules: a cap)."""

    def __init__(self, p: Plan, samples: np.ndarray) -> None:
        self.plan = p
        chains = LinkChains.from_plan(p)
        self.index, self.stage = find_stage(chains.uplink)
        self.step = RoundStep(p, chains, LAYOUT, None, LinkStates(CodecState(), CodecState()), self.submit,
                              member_id="c0000")  # fmt: skip
        self.uploads: list[bytes] = []
        self.cap = p.prepass.max_retrains  # the aggregator's
        self.ctx = PrepassContext(self.upload, "c0000", 0, p, self.step, None, np.zeros(0), np.zeros(0))
        self.ctx.samples = samples
        self.round = 0

    def submit(self, *args) -> int:
        return 100

    def upload(self, architecture: dict, blob: bytes) -> int:
        assert architecture == self.stage.architecture(N)
        if len(self.uploads) > self.cap:
            raise FailedPrecondition("re-upload cap")
        self.uploads.append(blob)
        return len(blob)

    def prepass(self) -> None:
        """The prepass's AE training and upload, then the drift monitor, as `prepass.handle_task` leaves them."""
        enc, dec, _ = train_autoencoder(self.stage, self.ctx.samples, epochs=200, lr=0.01, seed=0)
        blob, dec = pack_decoder(self.stage, dec, "c0000", DECODER_CHAIN, N)
        self.up.update({**enc, **dec})
        self.upload(self.stage.architecture(N), blob)
        if self.plan.prepass.retrain_nmse is not None:
            self.step.on_submitted = DriftMonitor(self.ctx, self.index, self.stage).observe

    @property
    def up(self):
        return self.step.states.up.stage(self.index)

    def send(self, update: np.ndarray) -> float:
        self.round += 1
        download = Download(self.round, np.zeros(N, np.float32), 0, time.perf_counter())
        assert self.step.finish(download, update, 10) is not None
        return float(self.up[AE_NMSE][0])


def test_drift_triggers_exactly_one_retraining_and_its_decoder_serves_the_new_updates() -> None:
    rng = np.random.default_rng(0)
    old, new, prepass = drift_setup(rng)
    c = Collaborator(plan(retrain_nmse=0.7, max_retrains=1), prepass)
    c.prepass()
    first = c.uploads[0]
    before = [c.send(u) for u in updates(old, 3, rng)]
    assert max(before) < 0.05 and len(c.uploads) == 1  # the AE fits its own distribution: nothing to do
    drifted = [c.send(u) for u in updates(new, 2, rng)]
    assert min(drifted) > 0.9  # another subspace: the AE part misses nearly all of it
    # the window (2 rounds) is past the threshold: re-trained on the 2 recent updates and re-uploaded, once
    assert len(c.uploads) == 2 and c.uploads[1] != first
    (retrain,) = c.ctx.record["retrains"]
    assert (
        retrain["round"] == 5
        and retrain["samples"] == 2
        and retrain["nmse"] == pytest.approx(np.mean(drifted))
    )
    assert retrain["decoder"] == len(c.uploads[1]) and c.ctx.record["decoder"] == len(c.uploads[1])
    # the collaborator now encodes with exactly the decoder the aggregator reads from its upload
    received, _ = validate_decoder(
        c.uploads[1], c.stage.decoder_shapes(N), len(c.uploads[1]), decoder_chain(DECODER_CHAIN)
    )
    for k, v in received.items():
        assert np.array_equal(c.up[k], v)
    after = [c.send(u) for u in updates(new, 4, rng)]
    assert max(after) < 0.2, after  # the re-trained AE fits the new updates
    assert len(c.uploads) == 2  # the window refilled below the threshold, and the cap is 1 anyway


def test_without_a_threshold_nothing_is_retrained() -> None:
    rng = np.random.default_rng(1)
    _, new, prepass = drift_setup(rng)
    c = Collaborator(plan(), prepass)
    c.prepass()
    drifted = [c.send(u) for u in updates(new, 6, rng)]
    assert min(drifted) > 0.5 and len(c.uploads) == 1 and c.step.on_submitted is None
    assert "retrains" not in c.ctx.record


def test_a_refused_reupload_keeps_the_current_ae_and_stops() -> None:
    rng = np.random.default_rng(2)
    _, new, prepass = drift_setup(rng)
    c = Collaborator(plan(retrain_nmse=0.7, max_retrains=1), prepass)
    c.prepass()
    c.cap = 0  # the aggregator refuses what this collaborator believes it may send
    kept = {k: c.up[k].copy() for k in c.stage.decoder_shapes(N)}
    for u in updates(new, 4, rng):
        c.send(u)
    assert len(c.uploads) == 1 and "retrains" not in c.ctx.record
    for k, v in kept.items():
        assert np.array_equal(c.up[k], v)


def digits_plan(**prepass) -> Plan:
    """A tiny AE federation on digits: 2 collaborators, 4 rounds, a short prepass."""
    return Plan.from_json({
        "task": {"dataset": "digits", "partition": "iid"}, "model": {"name": "mlp"}, "rounds": 4, "seed": 0,
        "collaborators": {"min": 2}, "round_timeout_s": 60,
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "uplink": {"chain": "ae", "target": "delta"},
        "prepass": {"enabled": True, "epochs": 2, "snapshot_every": "batch", "variant": "chunked", "chunk": 1024,
                    "latent": 4, "ae_epochs": 10, "ae_lr": 0.01, "decoder_chain": DECODER_CHAIN, **prepass},
    })  # fmt: skip


def test_federation_installs_every_reupload_and_counts_it() -> None:
    """In-process, the real Federation: a threshold every update exceeds re-trains at rounds 1 and 2 (window 1,
    cap 2); the aggregator installs each re-upload (it decodes the next update with it) and counts it in eq. 4."""
    from fedsqueeze.aggregator import savings as sv
    from fedsqueeze.simulation.inprocess import InProcessFederation

    sim = InProcessFederation(
        digits_plan(allow_retrain=True, retrain_nmse=1e-9, retrain_window=1, max_retrains=2)
    )
    result = sim.run()
    report = result.report
    assert len(report["rounds"]) == 4 and all(r["participants"] == 2 for r in report["rounds"])
    for c in sim.collaborators:
        rec = c.prepass.record
        assert [r["round"] for r in rec["retrains"]] == [1, 2]
        # the aggregator holds exactly the decoder this collaborator encodes with: the last re-upload
        ours, theirs = c.states.up.stage(0), sim.fed.links.link(c.id).up.stage(0)
        for k in find_stage(sim.chains.uplink)[1].decoder_shapes(sim.layout.numel):
            assert np.array_equal(ours[k], theirs[k]), k
    assert report["prepass"]["decoders"] == {c.id: 3 for c in sim.collaborators}
    run = sv.as_run(report)
    sent = sum(c.prepass.record["decoder"] for c in sim.collaborators)
    reuploads = sum(r["decoder"] for c in sim.collaborators for r in c.prepass.record["retrains"])
    assert run["decoder_uploads"] == 6 and run["decoder_bytes"] == sent == report["summary"]["decoder"]
    assert run["decoder_bytes_in_rounds"] == reuploads > 0
    assert report["summary"]["savings_ratio"] == pytest.approx(run["up_raw"] / (run["up_wire"] + sent))
    # updates decoded with the re-uploaded decoders still train the model (0.26 -> 0.49 measured)
    accuracy = [r["accuracy"] for r in report["rounds"]]
    assert accuracy[-1] > accuracy[1] + 0.1 and accuracy[-1] > 0.4, accuracy


def test_federation_without_a_threshold_uploads_each_decoder_once() -> None:
    from fedsqueeze.simulation.inprocess import InProcessFederation

    sim = InProcessFederation(digits_plan(allow_retrain=True))
    report = sim.run().report
    assert report["prepass"]["decoders"] == {c.id: 1 for c in sim.collaborators}
    assert all("retrains" not in c.prepass.record for c in sim.collaborators)
    assert all(r["bytes"].get("decoder", 0) == 0 for r in report["rounds"])


def test_the_aggregator_caps_reuploads_per_collaborator() -> None:
    from fedsqueeze.aggregator.prepass import Prepass
    from fedsqueeze.errors import AlreadyExists

    p = plan(retrain_nmse=0.5, max_retrains=2)
    chains = LinkChains.from_plan(p)
    pre = Prepass(p.prepass, chains.uplink, LAYOUT)
    arch = find_stage(chains.uplink)[1].architecture(N)
    for uploads in range(3):  # the first upload and 2 re-uploads
        pre.installed["c0"] = uploads
        pre.check_upload("c0", arch)
    pre.installed["c0"] = 3
    with pytest.raises(FailedPrecondition, match="allows 2"):
        pre.check_upload("c0", arch)
    pre.check_upload("c1", arch)  # per collaborator
    no_retrain = plan(allow_retrain=False)
    pre = Prepass(no_retrain.prepass, chains.uplink, LAYOUT)
    pre.installed["c0"] = 1
    with pytest.raises(AlreadyExists):
        pre.check_upload("c0", arch)


@pytest.mark.parametrize("mode", ["per_collaborator", "shared"])
def test_a_reupload_after_the_last_checkpoint_survives_a_restart(tmp_path, mode: str) -> None:
    """A decoder re-uploaded between a checkpoint and a crash: the restarted aggregator decodes with it (the
    collaborator keeps its new AE), its count and bytes included; an upload the checkpoint holds is not redone."""
    from fedsqueeze.aggregator.federation import Federation

    p = digits_plan(allow_retrain=True, max_retrains=3, decoder=mode)
    fed = Federation(p, state_dir=tmp_path)
    a, b = fed.join("a", 100), fed.join("b", 100)
    stage = find_stage(fed.up_chain)[1]
    n = fed.layout.numel
    arch = stage.architecture(n)
    rng = np.random.default_rng(0)

    def upload(who) -> dict[str, np.ndarray]:
        dec = {k: rng.standard_normal(s).astype(np.float32) for k, s in stage.decoder_shapes(n).items()}
        blob, received = pack_decoder(stage, dec, who.collaborator_id, DECODER_CHAIN, n)
        fed.upload_decoder(who.collaborator_id, who.token, arch, blob)
        return received

    upload(a)
    if mode == "per_collaborator":
        upload(b)
    fed.checkpoint()
    before = fed.report.prepass_bytes["decoder"]
    latest = [upload(a), upload(a)][-1]  # two re-uploads after the checkpoint, then the "crash"
    resumed = Federation(p, state_dir=tmp_path)
    assert resumed.prepass.installed[a.collaborator_id] == 3
    held = resumed.links.link(a.collaborator_id).up.stage(resumed.prepass.index)
    assert all(np.array_equal(held[k], latest[k]) for k in latest)
    assert resumed.report.prepass_bytes["decoder"] == fed.report.prepass_bytes["decoder"] > before
    if mode == "shared":  # the other member is sent the newer shared decoder again
        assert (
            resumed.prepass.shared_payload is not None
            and b.collaborator_id not in resumed.prepass.shared_sent
        )
    else:  # b's upload was in the checkpoint already
        assert resumed.prepass.installed[b.collaborator_id] == 1
    # restarting again from the same checkpoint gives the same state; after a new checkpoint, nothing is re-counted
    assert Federation(p, state_dir=tmp_path).report.prepass_bytes == resumed.report.prepass_bytes
    resumed.checkpoint()
    again = Federation(p, state_dir=tmp_path)
    assert again.report.prepass_bytes == resumed.report.prepass_bytes
    assert again.prepass.installed == resumed.prepass.installed
