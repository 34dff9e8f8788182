"""Every error Djinn raises to a user: one base class, one stable code each.

The code travels over the wire, so a remote client re-raises the same class as the embedded engine.
"""
from __future__ import annotations


class DjinnError(Exception):
    """Base class. `code` is stable and machine-readable; `message` is for people."""

    code = "djinn_error"
    http_status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidRequest(DjinnError):
    code = "invalid_request"


class UnknownModel(DjinnError):
    code = "unknown_model"
    http_status = 404


class UnknownSite(DjinnError):
    code = "unknown_site"


class UnknownParameter(DjinnError):
    code = "unknown_parameter"
    http_status = 404


class UnknownSession(DjinnError):
    code = "unknown_session"
    http_status = 404


class UnknownCheckpoint(DjinnError):
    code = "unknown_checkpoint"
    http_status = 404


class InvalidTensor(DjinnError):
    """Wrong shape, wrong dtype, or NaN/Inf in a tensor a client sent."""

    code = "invalid_tensor"


class NonFinite(DjinnError):
    """A row's own activations or logits became NaN or Inf in a step (an edit overflowed, say): that row's
    call fails alone; every other row of the step goes on."""

    code = "non_finite"


class TokenOutOfRange(DjinnError):
    code = "token_out_of_range"


class ContextOverflow(DjinnError):
    code = "context_overflow"


class SessionBusy(DjinnError):
    """The session is running or paused and cannot take this call now."""

    code = "session_busy"
    http_status = 409


class NotPaused(DjinnError):
    code = "not_paused"
    http_status = 409


class SessionExpired(DjinnError):
    code = "session_expired"
    http_status = 410


class CapacityError(DjinnError):
    """The request can never fit in the KV pools, or a per-user limit is reached."""

    code = "capacity"
    http_status = 503


class LimitExceeded(DjinnError):
    code = "limit_exceeded"
    http_status = 429


class Unauthorized(DjinnError):
    code = "unauthorized"
    http_status = 401


class Forbidden(DjinnError):
    code = "forbidden"
    http_status = 403


class FrameTooLarge(DjinnError):
    code = "frame_too_large"
    http_status = 413


class ProtocolMismatch(DjinnError):
    code = "protocol_mismatch"


class MalformedFrame(DjinnError):
    code = "malformed_frame"


class Cancelled(DjinnError):
    code = "cancelled"
    http_status = 409


class InternalError(DjinnError):
    code = "internal"
    http_status = 500


class RankFailed(DjinnError):
    """A tensor-parallel rank of the model exited or stopped answering: the model cannot compute any more
    (restart the server)."""

    code = "rank_failed"
    http_status = 503


ERRORS_BY_CODE: dict[str, type[DjinnError]] = {
    cls.code: cls for cls in [DjinnError, *DjinnError.__subclasses__()]
}


def error_from_code(code: str, message: str) -> DjinnError:
    """Rebuild the typed error a server sent (unknown codes become the base class)."""
    return ERRORS_BY_CODE.get(code, DjinnError)(message)
