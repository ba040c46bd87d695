"""The one error the service raises for what a client did: the ingress answers it as OpenAI's JSON error."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    """Also what another organization's object answers: the same words, so nothing says it exists."""
    return ApiError(404, f"no {kind} {object_id!r}", f"{kind.replace(' ', '_')}_not_found", param)
