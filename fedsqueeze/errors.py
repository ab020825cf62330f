"""Domain errors with the gRPC status each maps to. Domain code raises these; the thin
servicer turns them into a status with the message, so the server never crashes on bad input."""

from __future__ import annotations

import grpc


class FederationError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FederationError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(FederationError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FederationError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(FederationError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(FederationError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(FederationError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FederationError):
    code = grpc.StatusCode.UNAVAILABLE
