"""Typed domain errors.

Domain code raises these; the one interceptor in ``shared.grpc_server`` maps them to gRPC
status codes, and the CLI prints their message. Keeping the mapping in one place means a
servicer never has to know about status codes.
"""
from __future__ import annotations

import re

import grpc

# Object reprs and addresses ("<Foo object at 0x7f...>") say nothing to a client and leak process layout.
_ADDRESS = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


def client_message(text: str) -> str:
    """An error message as a client may see it: no object reprs, no memory addresses."""
    return _ADDRESS.sub("<object>", text)


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
