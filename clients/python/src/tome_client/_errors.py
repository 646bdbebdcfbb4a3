"""What a failed call raises."""

from __future__ import annotations

import grpc


class TomeError(Exception):
    """A call the server (or the connection to it) failed: the gRPC status code and message.

    Attributes:
        code: the status code, e.g. `grpc.StatusCode.UNAUTHENTICATED`.
        message: the server's message (what to fix, for INVALID_ARGUMENT).
        retry_after: seconds the server asked to wait before calling again (a refusal for now:
            RESOURCE_EXHAUSTED with `retry-after`), when it gave them.
        attempts: calls made, retries included.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after: float | None = None, attempts: int = 1) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.attempts = attempts

    @property
    def code_name(self) -> str:
        """The code's name, e.g. `"UNAUTHENTICATED"`."""
        return str(self.code.name)

    def __repr__(self) -> str:
        return f"TomeError({self.code.name}, {self.message!r}, retry_after={self.retry_after!r}, attempts={self.attempts})"
