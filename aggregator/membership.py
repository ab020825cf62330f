"""Who is in the federation: ids, session tokens, shards, and whether each member is active or lost.

Not thread-safe by itself: the Federation calls it under its lock (`authenticate` reads only).
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from fedsqueeze.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)

MAX_NAME_LEN = 128
IDENTITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


@dataclass
class Member:
    id: str
    token: str  # the session token every RPC after Join must carry
    name: str  # a display name (hostname, pod name); not an identity
    shard_index: int  # which shard of a built-in data set it trains on (join order)
    num_samples: int = 0  # its last declared sample count (FedAvg weight)
    active: bool = True  # joined and not left
    lost: bool = False  # missed a deadline (or not back since a restart): not selected until it calls in
    last_round: int = 0  # the last round whose update from it was accepted (a resend gets ALREADY_EXISTS)
    decoder_bytes: int = 0  # decoder uploads accepted from it, for the report
    evaluates: bool = False  # it evaluates global models on its own held-out data (federated evaluation)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "token": self.token, "name": self.name, "shard_index": self.shard_index,
                "num_samples": self.num_samples, "active": self.active, "last_round": self.last_round,
                "decoder_bytes": self.decoder_bytes, "evaluates": self.evaluates}  # fmt: skip

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> Member:
        """A member restored from a checkpoint: lost until it calls in again."""
        return cls(id=str(m["id"]), token=str(m["token"]), name=str(m["name"]), shard_index=int(m["shard_index"]),
                   num_samples=int(m["num_samples"]), active=bool(m["active"]), last_round=int(m["last_round"]),
                   decoder_bytes=int(m.get("decoder_bytes", 0)), evaluates=bool(m.get("evaluates", False)), lost=True)  # fmt: skip


class Membership:
    def __init__(self, num_shards: int, max_members: int) -> None:
        self.num_shards = num_shards
        self.max_members = max_members  # members at once (joined and not left)
        self.members: dict[str, Member] = {}
        self.joined = 0  # joins ever (new members); the next one gets shard `joined % num_shards`

    def join(self, name: str, num_samples: int, identity: str | None) -> tuple[Member, bool]:
        """(member, rejoined). `identity` (the client certificate's common name under mTLS, or an
        enrollment token's) is then its id; joining again under a known identity re-issues the token
        and keeps the shard."""
        if len(name) > MAX_NAME_LEN:
            raise InvalidArgument(f"name is longer than {MAX_NAME_LEN} characters")
        if num_samples < 0:
            raise InvalidArgument("num_samples must be >= 0")
        if identity is not None and not IDENTITY_RE.fullmatch(identity):
            raise PermissionDenied("the client certificate's common name is not a valid collaborator id")
        known = self.members.get(identity) if identity is not None else None
        if known is not None:
            known.token = secrets.token_urlsafe(24)
            known.active, known.lost = True, False
            known.num_samples = num_samples or known.num_samples
            return known, True
        if sum(1 for m in self.members.values() if m.active) >= self.max_members:
            raise ResourceExhausted(f"the federation is full: {self.max_members} members (collaborators.max)")
        index = self.joined
        self.joined += 1
        member = Member(
            id=identity if identity is not None else f"c{index:04d}-{secrets.token_hex(3)}",
            token=secrets.token_urlsafe(24),
            name=name or f"collaborator-{index}",
            shard_index=index % self.num_shards,
            num_samples=num_samples,
        )
        self.members[member.id] = member
        return member, False

    def authenticate(self, member_id: str, token: str) -> Member:
        """The caller, if the token is its own (constant-time comparison)."""
        member = self.members.get(member_id)
        if member is None or not token:
            raise Unauthenticated("unknown collaborator or missing token: Join first")
        if not hmac.compare_digest(member.token.encode(), token.encode()):
            raise Unauthenticated("invalid token for this collaborator")
        if not member.active:
            raise FailedPrecondition("this collaborator has left the federation")
        return member

    def active_ids(self) -> set[str]:
        """Joined, not left, and not lost."""
        return {m.id for m in self.members.values() if m.active and not m.lost}

    def active_count(self) -> int:
        return sum(1 for m in self.members.values() if m.active and not m.lost)

    def to_json(self) -> dict[str, Any]:
        return {"members": [m.to_json() for m in self.members.values()], "joined": self.joined}

    def restore(self, data: dict[str, Any]) -> None:
        self.members = {m.id: m for m in (Member.from_json(d) for d in data["members"])}
        self.joined = int(data["joined"])
