"""Errors of the inference layer.

Errors a server raises on a request carry the gRPC status code they travel with;
the client turns a status back into the same class (`from_status`), so a caller
sees one typed error whether the fault was local or remote.
"""

from __future__ import annotations

import grpc

from corolla.errors import CorollaError


class InferenceError(CorollaError):
    """Base class of the inference layer's errors."""

    exit_code = 3
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class ModelLoadError(InferenceError):
    """A checkpoint directory is missing, incomplete, or of an unsupported architecture."""

    exit_code = 4
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class BadRequestError(InferenceError):
    """A request is malformed: bad tensor bytes, wrong shape or dtype, bad fields."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class MessageTooLargeError(BadRequestError):
    """A message is larger than the configured limit."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SpanNotServedError(InferenceError):
    """The request names blocks that this server does not hold."""

    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class SessionNotFoundError(InferenceError):
    """The request names an inference session that is not open on this stream."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class AdapterNotFoundError(InferenceError):
    """The request names an adapter this server does not hold (never put, or evicted): put it again."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class StepNotFoundError(InferenceError):
    """ClipSum names a step whose per-sample gradients this server does not hold (expired or used)."""

    grpc_code = grpc.StatusCode.NOT_FOUND


class SessionLimitError(InferenceError):
    """Too many sessions, or their KV caches would exceed the server's memory budget."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class CallLimitError(InferenceError):
    """The calling peer has as many calls open on this server as one peer may: others go first."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StreamTimeoutError(InferenceError):
    """An inference stream sent no open message within the server's open timeout."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class CallAbandonedError(InferenceError):
    """The caller went away or its deadline passed: the server stopped the call's work."""

    grpc_code = grpc.StatusCode.CANCELLED


class MaxLengthExceededError(InferenceError):
    """An inference step would grow a session past the `max_length` it was opened with."""

    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class AccessDeniedError(InferenceError):
    """The peer's certificate is missing, untrusted, revoked, or of a role not allowed here."""

    exit_code = 9
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class RemoteError(InferenceError):
    """A server answered with an error status that maps to no more specific class."""


class ServerUnavailableError(RemoteError):
    """A server could not be reached or went away mid-call: the error a client retries elsewhere."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class RoutingError(InferenceError):
    """No chain of live servers covers the blocks the client needs."""

    exit_code = 5
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DiscoveryError(InferenceError):
    """The DHT could not be started, joined or queried."""

    exit_code = 6
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeviceError(InferenceError):
    """The device asked for (`--device cuda`) is not on this machine, or cannot compute in the dtype asked for."""

    exit_code = 15
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
