"""The collaborator's side of the prepass (seed 001 section 3): snapshots, autoencoder training, decoder upload.

1. Train the global model locally for `prepass.epochs` epochs without aggregation, recording the
   weights every batch or epoch (`snapshot_every`).
2. Build the AE's data set: the weights themselves (`what: weights`, the paper) or deltas between
   snapshots `span` apart, each scaled to unit RMS (`what: update`, the hybrid; span 0 means one
   round of local training, so the AE sees what a round's update looks like).
3. Train the autoencoder with the MSE of eq. 3, keep encoder and decoder in the uplink CodecState,
   and upload only the decoder (safetensors, bound to this collaborator's id in its metadata).

4. Dynamic re-training (seed 001 section 4.2, `DriftMonitor`): with `prepass.retrain_nmse`, the AE's
   error on this collaborator's own updates is watched round by round; past the threshold the AE is
   re-trained on the recent updates and the decoder re-uploaded (counted as decoder bytes).

Shared decoder mode (case a): the first collaborator to join trains the AE and uploads its decoder;
the aggregator sends that decoder to everyone else, and each of them fits only an encoder to it on
its own prepass data (the decoder frozen, the same loss), so no prepass data leaves a collaborator.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsqueeze.codecs import CodecError, Layout
from fedsqueeze.codecs.autoencoder import (
    AE_NMSE,
    Autoencoder,
    decoder_chain,
    decoder_to_bytes,
    find_stage,
    validate_decoder,
)
from fedsqueeze.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from fedsqueeze.messages import Task
from fedsqueeze.models import get_flat, set_flat
from fedsqueeze.plan import Plan
from fedsqueeze.training import train_local

from .round_step import LinkStates, RoundStep, prepass_seed

log = logging.getLogger("fedsqueeze.collaborator")

ROLE_TRAIN = "train-autoencoder"
ROLE_ENCODER = "train-encoder"
SHARED_DECODER = "shared-decoder"


def record_snapshots(model: Any, x: np.ndarray, y: np.ndarray, plan: Plan, seed: int) -> np.ndarray:
    """Train for prepass.epochs without aggregation; rows are the flat weights, the start first."""
    spec, t = plan.prepass, plan.training
    batches = -(-len(y) // t.batch_size)
    snaps = [get_flat(model)]

    def on_step(epoch: int, batch: int) -> None:
        if spec.snapshot_every == "batch" or batch == batches - 1:
            snaps.append(get_flat(model))

    train_local(model, x, y, epochs=spec.epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                weight_decay=t.weight_decay, seed=seed, on_step=on_step, optimizer=t.optimizer)  # fmt: skip
    return np.stack(snaps)


def training_set(snaps: np.ndarray, plan: Plan, num_samples: int) -> np.ndarray:
    """The AE's data set from the snapshots: weights (paper) or unit-RMS deltas (hybrid)."""
    spec = plan.prepass
    if spec.what == "weights":
        return snaps.astype(np.float32)
    span = spec.span
    if span == 0:
        per_epoch = 1 if spec.snapshot_every == "epoch" else -(-num_samples // plan.training.batch_size)
        t = plan.training
        span = max(
            1,
            t.local_steps if t.local_steps and spec.snapshot_every == "batch" else t.local_epochs * per_epoch,
        )
    span = min(span, len(snaps) - 1)
    deltas = snaps[span:] - snaps[:-span]
    if spec.snapshot_every == "batch" and span > 1:
        # short deltas too: error feedback mixes scales
        deltas = np.concatenate([deltas, snaps[1:] - snaps[:-1]])
    rms = np.sqrt(np.mean(np.square(deltas, dtype=np.float64), axis=1, keepdims=True))
    keep = rms[:, 0] > 0
    return (deltas[keep] / rms[keep]).astype(np.float32)


def _rows(stage: Autoencoder, samples: np.ndarray) -> np.ndarray:
    if stage.variant == "dense":
        return samples
    n = samples.shape[1]
    padded = np.zeros((len(samples), stage.padded_length(n)), np.float32)
    padded[:, :n] = samples
    if stage.variant == "conv":
        return padded.reshape(len(samples), 1, -1)
    return padded.reshape(-1, stage.chunk)


def _convnet(channels: list[int], kernel: int, stride: int, transpose: bool) -> Any:
    """The numpy `conv1d` / `conv_transpose1d` of codecs/autoencoder.py, in torch, tanh between layers."""
    from torch import nn

    layer = nn.ConvTranspose1d if transpose else nn.Conv1d
    layers: list[Any] = []
    for j, (a, b) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        layers.append(layer(a, b, kernel, stride=stride, padding=(kernel - stride) // 2))
        if j < len(channels) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _weighted(net: Any) -> list[Any]:
    from torch import nn

    return [m for m in net if isinstance(m, nn.Linear | nn.Conv1d | nn.ConvTranspose1d)]


def _mlp(sizes: list[int]) -> Any:
    from torch import nn

    layers: list[Any] = []
    for j, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if j < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _export(net: Any, prefix: str) -> dict[str, np.ndarray]:

    out: dict[str, np.ndarray] = {}
    for j, lin in enumerate(_weighted(net)):
        out[f"{prefix}.{j}.weight"] = lin.weight.detach().numpy().astype(np.float32, copy=True)
        out[f"{prefix}.{j}.bias"] = lin.bias.detach().numpy().astype(np.float32, copy=True)
    return out


def _load(net: Any, prefix: str, tensors: dict[str, np.ndarray]) -> None:
    import torch

    with torch.no_grad():
        for j, lin in enumerate(_weighted(net)):
            lin.weight.copy_(torch.from_numpy(tensors[f"{prefix}.{j}.weight"]))
            lin.bias.copy_(torch.from_numpy(tensors[f"{prefix}.{j}.bias"]))


def train_autoencoder(
    stage: Autoencoder,
    samples: np.ndarray,
    *,
    epochs: int,
    lr: float,
    seed: int = 0,
    decoder: dict[str, np.ndarray] | None = None,
    init: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[float]]:
    """Fit the AE to `samples` (rows) with eq. 3's MSE; with `decoder`, fit only an encoder to it;
    with `init` (encoder and decoder tensors), start from that AE (re-training).

    Returns (encoder tensors, decoder tensors, loss per epoch).
    """
    import torch

    n = samples.shape[1]
    sizes = stage.sizes(n)
    torch.manual_seed(seed)
    if stage.variant == "conv":
        enc = _convnet(sizes, stage.kernel, stage.stride, transpose=False)
        dec = _convnet(list(reversed(sizes)), stage.kernel, stage.stride, transpose=True)
    else:
        enc, dec = _mlp(sizes), _mlp(list(reversed(sizes)))
    if init is not None:
        _load(enc, "enc", init)
        _load(dec, "dec", init)
    if decoder is not None:
        _load(dec, "dec", decoder)
        for p in dec.parameters():
            p.requires_grad_(False)
    data = torch.from_numpy(np.ascontiguousarray(_rows(stage, samples)))
    params = list(enc.parameters()) + ([] if decoder is not None else list(dec.parameters()))
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    batch = 256 if stage.variant == "chunked" else 64
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        total = 0.0
        for start in range(0, len(data), batch):
            xb = data[order[start : start + batch]]
            opt.zero_grad()
            loss = torch.mean((dec(enc(xb)) - xb) ** 2)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        losses.append(total / len(data))
    return _export(enc, "enc"), _export(dec, "dec"), losses


def pack_decoder(
    stage: Autoencoder, dec: dict[str, np.ndarray], member_id: str, chain_config: str, n: int
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The upload's bytes (through the plan's decoder chain) and the decoder as the aggregator will read them."""
    chain = decoder_chain(chain_config)
    blob = decoder_to_bytes(dec, member_id, chain)
    received, _ = validate_decoder(blob, stage.decoder_shapes(n), len(blob), chain)
    return blob, received


@dataclass
class PrepassContext:
    """What the collaborator loop hands to the prepass, and what the prepass leaves behind."""

    # (architecture, safetensors bytes) -> bytes accepted
    upload_decoder: Callable[[dict[str, Any], bytes], int]
    member_id: str
    shard_index: int
    plan: Plan
    step: RoundStep  # its chains, layout and link states; its download decoding
    model: Any  # torch.nn.Module
    x: np.ndarray
    y: np.ndarray
    samples: np.ndarray | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return self.step.layout

    @property
    def states(self) -> LinkStates:
        return self.step.states


def handle_task(ctx: PrepassContext, task: Task) -> dict[str, Any]:
    """Run one PREPASS task: the local prepass (and AE training, upload), or fit an encoder to the shared decoder."""
    found = find_stage(ctx.step.chains.uplink)
    if found is None:
        raise CodecError("the aggregator sent a PREPASS task, but the uplink chain has no `ae` stage")
    index, stage = found
    plan = ctx.plan
    spec = plan.prepass
    state = ctx.states.up.stage(index)
    n = ctx.layout.numel
    rec = ctx.record
    t0 = time.perf_counter()
    if task.message == SHARED_DECODER:
        if task.model is None or zlib.crc32(task.model.data) != task.model.fingerprint:
            raise CodecError("shared decoder: missing or corrupt")
        tensors, _ = validate_decoder(
            task.model.data,
            stage.decoder_shapes(n),
            stage.decoder_nbytes(n) + (1 << 16),
            decoder_chain(spec.decoder_chain),
        )
        rec["down_wire"] = rec.get("down_wire", 0) + task.model.wire_size
        rec["down_raw"] = rec.get("down_raw", 0) + len(task.model.data)
        if ctx.samples is None:
            raise CodecError("shared decoder arrived before this collaborator's prepass")
        enc, dec, losses = train_autoencoder(
            stage, ctx.samples, epochs=spec.ae_epochs, lr=spec.ae_lr, seed=plan.seed, decoder=tensors
        )
        state.update(enc)
        state.update(dec)
        rec.update(role=ROLE_ENCODER, encoder_loss=losses[-1], encoder_seconds=time.perf_counter() - t0)
        log.info("fitted an encoder to the shared decoder: loss %.4g", losses[-1])
        return rec
    if task.model is None:
        raise CodecError("PREPASS task without a model")
    start = ctx.step.decode_download(task.model)
    set_flat(ctx.model, start)
    snaps = record_snapshots(ctx.model, ctx.x, ctx.y, plan, seed=prepass_seed(plan, ctx.shard_index))
    ctx.samples = training_set(snaps, plan, len(ctx.y))
    set_flat(ctx.model, start)
    rec.update(
        down_raw=ctx.layout.raw_bytes,
        down_wire=task.model.wire_size,
        snapshots=len(snaps),
        samples=len(ctx.samples),
    )
    if task.message == ROLE_ENCODER:
        rec["role"] = ROLE_ENCODER
        return rec  # the shared decoder comes with a later PREPASS task
    enc, dec, losses = train_autoencoder(
        stage, ctx.samples, epochs=spec.ae_epochs, lr=spec.ae_lr, seed=plan.seed
    )
    blob, dec = pack_decoder(stage, dec, ctx.member_id, spec.decoder_chain, n)
    state.update(enc)
    state.update(dec)  # what the aggregator will decode with, rounded by the decoder chain
    sent = ctx.upload_decoder(stage.architecture(n), blob)
    rec.update(role=ROLE_TRAIN, decoder=sent, ae_loss=losses[-1], ae_seconds=time.perf_counter() - t0)
    if spec.retrain_nmse is not None:
        ctx.step.on_submitted = DriftMonitor(ctx, index, stage).observe
    log.info("prepass: %d snapshots, AE loss %.4g, decoder %d bytes uploaded", len(snaps), losses[-1], sent)
    return rec


def unit_rms(x: np.ndarray) -> np.ndarray | None:
    """x scaled to unit RMS, as the AE's update samples are; None for an all-zero x."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return (x / rms).astype(np.float32) if rms > 0 else None


class DriftMonitor:
    """Dynamic re-training (seed 001 sections 4.2, 5.2): watch the AE's error on this collaborator's own
    updates and, when it drifts, re-train the AE on the recent ones and re-upload the decoder.

    After each update the aggregator took, the `ae` stage has left the NMSE of its AE part (alpha * Dec(z)
    against what it encoded) in the sender's state. When its mean over the last `prepass.retrain_window`
    rounds exceeds `prepass.retrain_nmse`, the AE (warm-started from the current one) is trained on the last
    `prepass.retrain_updates` updates (unit RMS; the weights themselves in weights mode), its decoder goes
    through the plan's decoder chain and `UploadDecoder` as in the prepass, and only once the aggregator has
    installed it does this side switch to the new AE, so the next update is decoded with the decoder it was
    encoded for. At most `prepass.max_retrains` times; a refused upload keeps the old AE and stops re-training.
    """

    def __init__(self, ctx: PrepassContext, index: int, stage: Autoencoder) -> None:
        spec = ctx.plan.prepass
        assert spec.retrain_nmse is not None
        self.ctx, self.index, self.stage = ctx, index, stage
        self.threshold = spec.retrain_nmse
        self.errors: deque[float] = deque(maxlen=spec.retrain_window)
        self.recent: deque[np.ndarray] = deque(maxlen=spec.retrain_updates)
        self.retrains = 0
        self.stopped = False

    def observe(self, round_number: int, update: np.ndarray) -> None:
        """Record one submitted update and its AE error; re-train when the window's mean is past the threshold."""
        state = self.ctx.states.up.stage(self.index)
        if AE_NMSE not in state or self.stopped:
            return
        self.errors.append(float(state[AE_NMSE][0]))
        sample = unit_rms(update) if self.stage.what == "update" else update.astype(np.float32)
        if sample is not None:
            self.recent.append(sample)
        spec = self.ctx.plan.prepass
        if len(self.errors) < (self.errors.maxlen or 1) or self.retrains >= spec.max_retrains:
            return
        mean = float(np.mean(self.errors))
        if mean > self.threshold and self.recent:
            self.retrain(round_number, mean)

    def retrain(self, round_number: int, mean_nmse: float) -> None:
        ctx, stage, spec = self.ctx, self.stage, self.ctx.plan.prepass
        t0 = time.perf_counter()
        state = ctx.states.up.stage(self.index)
        n = ctx.layout.numel
        current = {k: state[k] for k in (*stage.encoder_shapes(n), *stage.decoder_shapes(n))}
        samples = np.stack(list(self.recent))
        enc, dec, losses = train_autoencoder(stage, samples, epochs=spec.ae_epochs, lr=spec.ae_lr,
                                             seed=ctx.plan.seed + round_number, init=current)  # fmt: skip
        blob, dec = pack_decoder(stage, dec, ctx.member_id, spec.decoder_chain, n)
        try:
            sent = ctx.upload_decoder(stage.architecture(n), blob)
        except (AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied) as exc:
            log.warning(
                "round %d: re-trained decoder refused (%s); keeping the current AE", round_number, exc
            )
            self.stopped = True
            return
        state = ctx.states.up.stage(self.index)  # the uplink state as it is now
        state.update(enc)
        state.update(dec)
        self.retrains += 1
        self.errors.clear()
        rec = ctx.record
        rec["decoder"] = rec.get("decoder", 0) + sent
        rec.setdefault("retrains", []).append(
            {
                "round": round_number,
                "nmse": mean_nmse,
                "samples": len(samples),
                "ae_loss": losses[-1],
                "decoder": sent,
                "seconds": time.perf_counter() - t0,
            }  # fmt: skip
        )
        log.info("round %d: AE NMSE %.3g > %.3g over %d rounds: re-trained on %d updates, decoder %d bytes re-uploaded",
                 round_number, mean_nmse, self.threshold, self.errors.maxlen, len(samples), sent)  # fmt: skip
