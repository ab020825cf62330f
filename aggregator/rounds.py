"""Round control: who is selected, which updates a round accepts, and when it closes.

Every round has a deadline (`round_timeout_s`) and a quorum (`quorum` accepted updates). It closes
when quorum is met and every selected active member has answered, or at the deadline; a round that
misses quorum is re-opened for another deadline up to `round_retries` times, open to every active
member, keeping its updates. Updates are identified by (member, round): a repeat of an accepted
update gets ALREADY_EXISTS, one for a closed or future round FAILED_PRECONDITION.

`RoundControl` runs under the Federation's condition variable (`cond`), which it waits on, and
calls `announce` (under it) whenever members may have a new task: a round opens, or widens.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedsqueeze.errors import AlreadyExists, FailedPrecondition, PermissionDenied, Unavailable
from fedsqueeze.plan import Plan
from fedsqueeze.report import BYTE_KEYS

from .evaluation import WeightedMean
from .membership import Member
from .strategy import Strategy

log = logging.getLogger("fedsqueeze.aggregator")

UPLOAD_GRACE_S = 5.0  # at its close, a round waits this long for updates already being decoded


@dataclass
class RoundState:
    number: int
    participants: set[str]  # selected (widened to every active member when quorum is out of reach)
    deadline: float
    strategy: Strategy  # the running aggregate of the accepted updates
    started: float = field(default_factory=time.monotonic)
    attempt: int = 0  # 0: first try; n: n-th retry after a missed quorum
    submitted: set[str] = field(default_factory=set)  # accepted updates
    receiving: set[str] = field(default_factory=set)  # updates being decoded now
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    # downloads handed out again
    resent: dict[str, int] = field(default_factory=lambda: {"messages": 0, "wire": 0})
    train: WeightedMean = field(default_factory=WeightedMean)  # the participants' reported training metrics

    def wants_update_from(self, member_id: str) -> bool:
        return member_id in self.participants and member_id not in self.submitted


def select(active: set[str], plan: Plan, number: int) -> set[str]:
    """The members round `number` selects: `fraction` of the active ones (at least `min_per_round`),
    drawn from the plan's seed and the round number, so a restarted aggregator draws the same."""
    ordered = sorted(active)
    c = plan.collaborators
    k = min(len(ordered), max(c.min_per_round, math.ceil(c.fraction * len(ordered))))
    rng = np.random.default_rng([plan.seed, number])
    return {ordered[i] for i in rng.choice(len(ordered), size=k, replace=False)} if k else set()


@dataclass
class ClosedRound:
    state: RoundState
    missing: set[str]  # selected, and no update by the close


class RoundControl:
    def __init__(
        self,
        plan: Plan,
        cond: threading.Condition,
        active_ids: Callable[[], set[str]],
        announce: Callable[[], None],
    ) -> None:
        self.plan = plan
        self.cond = cond
        self.active_ids = active_ids
        self.announce = announce
        self.current: RoundState | None = None
        self.last: RoundState | None = None  # the round closed most recently (its record shares its `bytes`)
        self.completed = 0  # rounds finished (ok or failed); the next round is completed + 1

    def open(self, number: int, strategy: Strategy) -> RoundState:
        """Open round `number` (under cond)."""
        rnd = RoundState(
            number,
            select(self.active_ids(), self.plan, number),
            time.monotonic() + self.plan.round_timeout_s,
            strategy,
        )
        self.current = rnd
        self.announce()
        return rnd

    def run(self, rnd: RoundState, stop: threading.Event) -> ClosedRound:
        """Wait until the round can close, retrying a missed quorum, then close it (under cond)."""
        quorum, retries = self.plan.quorum, self.plan.round_retries
        while True:
            self._wait(rnd, stop)
            if rnd.strategy.count >= quorum or rnd.attempt >= retries or stop.is_set():
                break
            # Quorum missed: re-open the round (same number, same global model, the updates it has
            # kept) for another deadline, open to every active member.
            rnd.attempt += 1
            rnd.participants |= self.active_ids()
            rnd.deadline = time.monotonic() + self.plan.round_timeout_s
            log.warning(
                "round %d: %d of %d updates by the deadline; retry %d of %d",
                rnd.number,
                rnd.strategy.count,
                quorum,
                rnd.attempt,
                retries,
            )
            self.announce()
        grace = time.monotonic() + UPLOAD_GRACE_S
        while rnd.receiving and time.monotonic() < grace:
            self.cond.wait(0.05)
        self.current, self.last = None, rnd
        self.cond.notify_all()
        return ClosedRound(rnd, rnd.participants - rnd.submitted)

    def _wait(self, rnd: RoundState, stop: threading.Event) -> None:
        """Until quorum is met and every selected active member has submitted, or the deadline.
        When the selected ones can no longer make quorum, every active member may join in."""
        quorum = self.plan.quorum
        while not stop.is_set() and time.monotonic() < rnd.deadline:
            active = self.active_ids()
            pending = (rnd.participants & active) - rnd.submitted
            if rnd.strategy.count >= quorum and not pending:
                return
            if rnd.strategy.count + len(pending) < quorum and active - rnd.participants:
                rnd.participants |= active
                self.announce()
            self.cond.wait(0.25)

    def check_upload(self, member: Member, round_number: int, phase: str) -> RoundState:
        """The open round an update from `member` for `round_number` belongs to, or the error that says why not."""
        if round_number == member.last_round and round_number > 0:
            raise AlreadyExists(f"the update from {member.id} for round {round_number} was already accepted")
        rnd = self.current
        if rnd is not None and member.id in rnd.receiving:
            raise Unavailable(f"an update from {member.id} is being decoded; retry shortly")
        if phase != "training" or rnd is None:
            if 0 < round_number <= self.completed:
                raise FailedPrecondition(f"stale update: round {round_number} is closed (phase: {phase})")
            raise FailedPrecondition(f"no round is open (phase: {phase})")
        if round_number < rnd.number:
            raise FailedPrecondition(
                f"stale update: round {round_number} is closed, round {rnd.number} is open"
            )
        if round_number != rnd.number:
            raise FailedPrecondition(f"update for round {round_number}, but round {rnd.number} is open")
        if member.id not in rnd.participants:
            raise PermissionDenied(f"{member.id} was not selected for round {rnd.number}")
        if member.id in rnd.submitted:
            raise AlreadyExists(f"duplicate update from {member.id} for round {rnd.number}")
        return rnd
