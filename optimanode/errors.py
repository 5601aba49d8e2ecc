"""One root error type, translated at the edges.

The tree::

    OptimaNodeError                 everything the node raises on purpose
    ├── ConfigError                 a settings file, variable or flag is wrong (names file, key, expectation)
    ├── JournalError                the SQLite journal cannot be opened, migrated or appended to
    ├── IllegalTransition           a trigger that the executor state table does not allow from this state
    ├── ModelFileError              a GGUF file cannot be used (unparseable, truncated, vocab-only, ...)
    └── RequestError                a request ends with a stable ``code`` a Gateway can act on
        ├── PeerError               the caller broke the contract (bad_request, unknown_model, ...)
        └── NodeFault               we could not serve (worker_crashed, overloaded, deadline_exceeded, ...)

``RequestError.code`` values are part of the protocol (docs/protocol.md); never rename one.
``BY_CODE`` is the one table from a code to its class; ``error_for`` builds the error a code names
(a worker's ``Failed``, say).
"""

from __future__ import annotations

from typing import Any


class OptimaNodeError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(OptimaNodeError):
    """A setting is wrong; the message names the source (file, environment, flag), the key and what was expected."""

    def __init__(self, source: str, key: str, expected: str, got: Any = None) -> None:
        self.source, self.key, self.expected, self.got = source, key, expected, got
        detail = f"{source}: {key}: expected {expected}"
        if got is not None:
            detail += f", got {got!r}"
        super().__init__(detail)


class JournalError(OptimaNodeError):
    """The journal could not be opened, migrated, read or appended to. Nothing was acknowledged."""


class IllegalTransition(OptimaNodeError):
    """A trigger the state table does not allow from the current state; the state is unchanged."""

    def __init__(self, executor_id: str, trigger: str, state: str) -> None:
        self.executor_id, self.trigger, self.state = executor_id, trigger, state
        super().__init__(f"executor {executor_id}: trigger {trigger!r} is not allowed in state {state!r}")


class ModelFileError(OptimaNodeError):
    """A model file cannot be registered as runnable; ``reason`` is shown to the operator."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class RequestError(OptimaNodeError):
    """A request failed with a stable code (see docs/protocol.md) and a human message."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        if code is not None:
            self.code = code
        self.message = message
        self.details = details
        super().__init__(f"{self.code}: {message}")


class PeerError(RequestError):
    """The caller broke the contract: the request cannot succeed as sent."""

    code = "bad_request"


class BadRequest(PeerError):
    code = "bad_request"


class UnknownModel(PeerError):
    code = "unknown_model"


class ModelNotRunning(PeerError):
    code = "model_not_running"


class ContextOverflow(PeerError):
    code = "context_overflow"


class Unauthorized(PeerError):
    code = "unauthorized"


class NodeFault(RequestError):
    """We could not serve the request; trying again later may succeed."""

    code = "internal"


class Overloaded(NodeFault):
    code = "overloaded"


class WorkerCrashed(NodeFault):
    code = "worker_crashed"


class Cancelled(NodeFault):
    code = "cancelled"


class ShuttingDown(NodeFault):
    code = "shutting_down"


class DeadlineExceeded(NodeFault):
    """The request's deadline (its own ``deadline_s`` or its model's) passed before it ended."""

    code = "deadline_exceeded"


BY_CODE: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (BadRequest, UnknownModel, ModelNotRunning, ContextOverflow, Unauthorized, NodeFault, Overloaded,
                WorkerCrashed, Cancelled, ShuttingDown, DeadlineExceeded)
}


def error_for(code: str, message: str, **details: Any) -> RequestError:
    """The RequestError of ``code``; an unknown code (a newer peer's) is a NodeFault keeping that code."""
    cls = BY_CODE.get(code)
    return cls(message, **details) if cls is not None else NodeFault(message, code=code, **details)
