"""Domain errors: what went wrong, in the federation's terms. No transport here.

Domain code (the federation, the collaborator's round step) raises and catches these. The gRPC
edge maps each class to a status code and back (`fedsqueeze/wire.py`), so the aggregator answers
bad input with a status and a message instead of crashing, and the collaborator's code branches on
these classes, never on status codes. `status` is the class's name in the canonical error model
(the names gRPC's status codes use too), for logs and metric labels.
"""

from __future__ import annotations

from typing import ClassVar


class FederationError(Exception):
    """Base class; a message a person can act on."""

    status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FederationError):
    """The request itself is wrong: malformed, corrupt, the wrong chain or layout, out of range."""

    status: ClassVar[str] = "INVALID_ARGUMENT"


class Unauthenticated(FederationError):
    """Unknown collaborator or wrong token (Join first, or again)."""

    status: ClassVar[str] = "UNAUTHENTICATED"


class PermissionDenied(FederationError):
    """Authenticated, but not allowed to do this (not selected, another identity's credentials)."""

    status: ClassVar[str] = "PERMISSION_DENIED"


class FailedPrecondition(FederationError):
    """Not now: the round closed, the federation finished, the collaborator left."""

    status: ClassVar[str] = "FAILED_PRECONDITION"


class AlreadyExists(FederationError):
    """Done before: a resent update or decoder that was already accepted."""

    status: ClassVar[str] = "ALREADY_EXISTS"


class ResourceExhausted(FederationError):
    """The aggregator is busy (every upload slot taken); retry later."""

    status: ClassVar[str] = "RESOURCE_EXHAUSTED"


class Unavailable(FederationError):
    """Transient: retry shortly."""

    status: ClassVar[str] = "UNAVAILABLE"


class Internal(FederationError):
    """The other side failed in a way it did not explain."""

    status: ClassVar[str] = "INTERNAL"


class Unreachable(FederationError):
    """The aggregator could not be reached (or stayed busy) for as long as we were willing to wait."""

    status: ClassVar[str] = "UNAVAILABLE"
