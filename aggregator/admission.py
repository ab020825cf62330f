"""Who may join a federation (README "Admission"). Without a policy, Join is open (up to the member cap).

- a join secret (`aggregator serve --join-secret-file`): whoever presents it joins, each Join a new
  member, so only the member cap (`collaborators.max`) bounds how many one holder can take;
- enrollment tokens (`--enrollment-file`, one per line): each token is one identity: its first Join
  creates the member, a later Join with it is the same member again (a restarted collaborator
  keeps its shard), so one token holder is one voice in every round;
- mutual TLS (`--tls-ca`): the client certificate's common name is the identity (aggregator/servicer.py),
  the strongest: an identity needs a certificate from your CA.
Secrets and tokens are compared in constant time, and tokens are kept only as SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from fedsqueeze.errors import Unauthenticated


class AdmissionError(ValueError):
    """An admission file that cannot be used (missing, empty)."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class JoinPolicy:
    secret_digest: str | None = None  # SHA-256 of the join secret
    enrolled: frozenset[str] = field(default_factory=frozenset)  # SHA-256 of each enrollment token

    @classmethod
    def from_files(
        cls, secret_file: str | Path | None = None, enrollment_file: str | Path | None = None
    ) -> JoinPolicy:
        secret = _read(secret_file, "join secret").strip() if secret_file else None
        if secret_file and not secret:
            raise AdmissionError(f"{secret_file}: the join secret is empty")
        enrolled: frozenset[str] = frozenset()
        if enrollment_file:
            lines = [line.strip() for line in _read(enrollment_file, "enrollment file").splitlines()]
            enrolled = frozenset(_digest(t) for t in lines if t and not t.startswith("#"))
            if not enrolled:
                raise AdmissionError(f"{enrollment_file}: no enrollment tokens (one per line)")
        return cls(_digest(secret) if secret else None, enrolled)

    @property
    def open(self) -> bool:
        return self.secret_digest is None and not self.enrolled

    def admit(self, join_token: str) -> str | None:
        """The identity an enrollment token stands for (None: no token identity); Unauthenticated if not admitted."""
        if self.open:
            return None
        digest = _digest(join_token or "")
        if self.enrolled:
            if any(hmac.compare_digest(digest, d) for d in self.enrolled):
                return f"enrolled-{digest[:16]}"
            if self.secret_digest is None:
                raise Unauthenticated(
                    "this federation admits enrolled collaborators only: give your enrollment token"
                )
        if self.secret_digest is not None and hmac.compare_digest(digest, self.secret_digest):
            return None
        raise Unauthenticated(
            "missing or wrong join token: this federation needs its join secret or an enrollment token"
        )


def _read(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise AdmissionError(f"cannot read the {what} {path}: {exc.strerror}") from exc
