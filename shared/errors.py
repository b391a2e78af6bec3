"""Typed domain errors.

Domain code raises these; the one interceptor in ``shared.grpc_server`` maps them to gRPC
status codes, and the CLI prints their message. Keeping the mapping in one place means a
servicer never has to know about status codes.
"""
from __future__ import annotations

import grpc


class TrainyardError(Exception):
    """Base of every error the platform reports to a user."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(TrainyardError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TrainyardError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TrainyardError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TrainyardError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TrainyardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TrainyardError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(TrainyardError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(TrainyardError, NotImplementedError):
    code = grpc.StatusCode.UNIMPLEMENTED


class IntegrityError(TrainyardError):
    """Stored bytes do not match their manifest (corruption or a partial write)."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(TrainyardError):
    """The call needs credentials it did not carry (or carried wrong ones)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TrainyardError):
    code = grpc.StatusCode.PERMISSION_DENIED
