"""One exception hierarchy for narun.

Every message says what was expected, what was got, and names the op, actor, rank or key.
"""

from __future__ import annotations


class NarunError(Exception):
    """Base class of every error narun raises on purpose."""


class ShapeError(NarunError, ValueError):
    """Operand shapes do not fit the op (message names the op and both shapes)."""


class DTypeError(NarunError, TypeError):
    """A dtype is not supported by the op or does not match another operand."""


class DeviceError(NarunError, RuntimeError):
    """A device is unknown or unavailable here (e.g. cuda without CuPy)."""


class DeviceMismatchError(DeviceError):
    """Operands live on different devices (message names both)."""


class GradError(NarunError, RuntimeError):
    """backward() was called where no gradient can flow, or a backward rule broke its contract."""


class ConfigError(NarunError, ValueError):
    """A config key is unknown, of the wrong type, or out of range (names the key path)."""


class CheckpointError(NarunError, RuntimeError):
    """A checkpoint is missing, truncated or fails its checksum (names the file), or a state
    dict does not fit the model or optimizer it is loaded into (names every bad key)."""


class ProtocolError(NarunError, ValueError):
    """A message on the wire is malformed, oversized, of unknown type or of another version."""


class ActorDiedError(NarunError, RuntimeError):
    """A remote actor is dead; calls to it fail at once instead of hanging."""


class RemoteError(NarunError, RuntimeError):
    """An exception raised inside a remote actor; carries the remote traceback."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        if self.remote_traceback:
            return f"{base}\n--- remote traceback ---\n{self.remote_traceback}"
        return base


class Refused(RemoteError):
    """A remote actor refused the request with an error code (`stale`, `not_found`, `busy`...)
    rather than failing on it: an expected answer the caller decides about."""

    def __init__(self, message: str, code: str, remote_traceback: str = "") -> None:
        super().__init__(message, remote_traceback)
        self.code = code


class WaitTimeout(NarunError, TimeoutError):
    """A wait ran past its deadline; the message names who was waited for and why."""
