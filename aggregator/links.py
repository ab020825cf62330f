"""The aggregator's end of every collaborator's links: the plan's chains and each member's codec states.

Each member has a `Link`: the receiver state of its uplink (predictors, an installed autoencoder
decoder) and the sender state of its downlink (error feedback, the residual's copy of what it
holds), guarded by the link's own lock. Encoding a download and decoding an upload run under that
lock only, never under the federation's; both work on a fork of the state (`CodecState.fork`, cheap)
that the caller commits once the federation has accepted the message, so a refused or interrupted
message never moves a state. Lock order: a link's lock may be held while the federation's is
taken, never the other way round.

Uploads are decoded only with the plan's uplink chain (and, for an autoencoder, the decoder
installed for that member): a payload that declares another chain or layout is refused.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedsqueeze.chains import LinkChains
from fedsqueeze.codecs import CodecError, CodecState, Layout, StageState, StateIdentity
from fedsqueeze.errors import FailedPrecondition, InvalidArgument
from fedsqueeze.metrics import Metrics
from fedsqueeze.payload import Payload


@dataclass
class Link:
    up: CodecState  # receiver side of the member's uplink
    down: CodecState  # sender side of its downlink
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The download handed out for a round, kept so that a re-sent copy is the same bytes (the
    # downlink state has already moved past it): (round, payload).
    sent: tuple[int, Payload] | None = None


@dataclass
class Download:
    """An encoded download, not yet committed: `commit()` moves the member's downlink state."""

    payload: Payload
    commit: Callable[[], None]
    fresh: bool  # False: a re-send of the payload already handed out for this round


@dataclass
class SharedEncode:
    """One download encoded for every member whose downlink state holds the arrays of `source` (all
    of them with full participation: they start from one primed state and move together)."""

    source: StateIdentity  # weak: an encode kept for a round holds no old state alive
    model: np.ndarray  # the model encoded: the same round may hand out another (a resumed federation)
    lock: threading.Lock = field(default_factory=threading.Lock)
    result: tuple[CodecState, Payload] | None = None  # the state after encoding, and the payload


@dataclass
class Upload:
    """A decoded update, not yet committed: `commit()` moves the member's uplink state."""

    update: np.ndarray
    commit: Callable[[], None]


class Links:
    def __init__(
        self, chains: LinkChains, layout: Layout, initial_model: np.ndarray, metrics: Metrics
    ) -> None:
        self.chains = chains
        self.layout = layout
        # downlink.prior "initial" primes every member's downlink with the initial model: kept only then.
        self._initial = initial_model.copy() if chains.prior_initial else None
        self.metrics = metrics
        self.up_codec, self.down_codec = str(chains.uplink), str(chains.downlink)
        self.up_fingerprint = chains.uplink.fingerprint(layout)
        self.down_fingerprint = chains.downlink.fingerprint(layout)
        self._links: dict[str, Link] = {}
        # a stateless downlink encodes once per round, for everyone
        self._shared: tuple[int, Payload] | None = None
        self._shared_lock = threading.Lock()
        # a stateful one once per round for each group of members in the same state: (round, encodes)
        self._shared_states: tuple[int, dict[tuple[object, ...], SharedEncode]] = (0, {})
        # every fresh downlink state is a fork of this one, so members start out sharing their arrays
        self._template_down = chains.downlink_state(self._initial)
        # Encoding is CPU-bound and takes a few model-sized temporaries: more at once than there are
        # cores is no faster and only costs memory (1,000 collaborators polling at once).
        self._encode_slots = threading.BoundedSemaphore(os.cpu_count() or 1)

    # -- members ----------------------------------------------------------------------------------
    def add(self, member_id: str) -> None:
        self._links[member_id] = Link(up=CodecState(), down=self._fresh_down())

    def link(self, member_id: str) -> Link:
        link = self._links.get(member_id)
        if link is None:
            raise FailedPrecondition(f"{member_id} has left the federation")
        return link

    def has(self, member_id: str) -> bool:
        return member_id in self._links

    def remove(self, member_id: str) -> None:
        """Free a member's states (it left): a model-sized downlink state each, so they must not pile up."""
        link = self._links.pop(member_id, None)
        if link is not None:
            with link.lock:  # let an encode or decode in flight finish with it
                link.sent = None

    def reset(self, member_id: str, keep_stage: int | None = None) -> None:
        """Fresh states for a member that joined again; `keep_stage`: an uplink stage whose state stays
        (an installed autoencoder decoder is not re-sent)."""
        link = self.link(member_id)
        with link.lock:
            up = CodecState()
            if keep_stage is not None and keep_stage >= 0:
                up.stage(keep_stage).update(link.up.stage(keep_stage))
            link.up, link.down, link.sent = up, self._fresh_down(), None

    def _fresh_down(self) -> CodecState:
        return self._template_down.fork()

    def install(self, member_id: str, stage: int, tensors: StageState) -> None:
        """Put tensors (an autoencoder decoder) into a member's uplink state at `stage`."""
        link = self.link(member_id)
        with link.lock:
            link.up.stage(stage).update(tensors)

    # -- downloads ------------------------------------------------------------------------------
    def encode_download(self, member_id: str, round_number: int, global_model: np.ndarray) -> Download:
        """The global model for one member and round; call under the member's link lock, commit if it is handed out."""
        link = self.link(member_id)
        if link.sent is not None and link.sent[0] == round_number:
            return Download(link.sent[1], lambda: None, fresh=False)
        chain = self.chains.downlink
        if not chain.stateful:
            with self._shared_lock:
                if self._shared is None or self._shared[0] != round_number:
                    self._shared = (round_number, self._encode(global_model, CodecState()))
                payload = self._shared[1]

            def commit_stateless() -> None:
                link.sent = (round_number, payload)

            return Download(payload, commit_stateless, fresh=True)
        state, payload = self._encode_stateful(link.down, round_number, global_model)

        def commit() -> None:
            link.down, link.sent = state, (round_number, payload)

        return Download(payload, commit, fresh=True)

    def _encode_stateful(
        self, source: CodecState, round_number: int, global_model: np.ndarray
    ) -> tuple[CodecState, Payload]:
        """(the state after encoding, the payload) for a member whose downlink state is `source`: encoded
        once per round for all members whose states hold the same arrays (`CodecState.identity`)."""
        identity = source.identity()
        with self._shared_lock:
            number, encodes = self._shared_states
            if number != round_number:
                encodes = {}
                self._shared_states = (round_number, encodes)
            entry = encodes.get(identity.key)
            if entry is None or entry.model is not global_model or not entry.source.same_arrays(identity):
                entry = SharedEncode(identity, global_model)
                encodes[identity.key] = entry
        with entry.lock:  # a member polling at the same moment waits for this encode instead of repeating it
            if entry.result is None:
                state = source.fork()
                entry.result = (state, self._encode(global_model, state))
        state, payload = entry.result
        return state.fork(), payload

    def _encode(self, global_model: np.ndarray, state: CodecState) -> Payload:
        with self._encode_slots:
            encoded = self.chains.downlink.encode(global_model, self.layout, state)
        self.metrics.record_encode("down", self.down_codec, encoded.stats)
        return Payload(data=encoded.data, fingerprint=self.down_fingerprint)

    # -- uploads --------------------------------------------------------------------------------
    def decode_upload(self, member_id: str, payload: Payload) -> Upload:
        """Decode one update with the plan's uplink chain into a fork of the member's state; call under
        the member's link lock. InvalidArgument for a payload of another chain or layout, or a corrupt one."""
        link = self.link(member_id)
        chain = self.chains.uplink
        payload.check(chain, self.layout, "update rejected")
        state = link.up.fork() if chain.stateful else link.up
        t0 = time.perf_counter()
        try:
            update = chain.decode(payload.data, self.layout, state)
        except CodecError as exc:
            raise InvalidArgument(f"update rejected: {exc}") from exc
        self.metrics.record_decode("up", self.up_codec, time.perf_counter() - t0)

        def commit() -> None:
            link.up = state

        return Upload(update, commit)

    # -- checkpoints ----------------------------------------------------------------------------
    def states(self, member_ids: Iterable[str]) -> dict[str, tuple[bytes, bytes]]:
        """Each member's (uplink, downlink) state bytes, for the checkpoint; members that have left are
        skipped. Downlink states that hold the same arrays (members that had the same downloads) are
        serialized once and given as one bytes object, which the checkpoint stores once."""
        out: dict[str, tuple[bytes, bytes]] = {}
        serialized: dict[tuple[object, ...], tuple[StateIdentity, bytes]] = {}
        for member_id in member_ids:
            link = self._links.get(member_id)
            if link is None:
                continue
            with link.lock:
                identity = link.down.identity()
                known = serialized.get(identity.key)
                if known is None or not known[0].same_arrays(identity):
                    known = serialized[identity.key] = (identity, link.down.to_bytes())
                out[member_id] = (link.up.to_bytes(), known[1])
        return out

    def restore(self, states: Mapping[str, tuple[bytes, bytes]]) -> None:
        """Each member's (uplink, downlink) state bytes from a checkpoint. Members whose downlink states
        are equal (all who had the same downloads) get forks of one state, so they share encodes again."""
        downs: dict[bytes, CodecState] = {}  # equal bytes: usually one object, hashed once
        for member_id, (up, down) in states.items():
            if down not in downs:
                downs[down] = CodecState.from_bytes(down)
            self._links[member_id] = Link(up=CodecState.from_bytes(up), down=downs[down].fork())
