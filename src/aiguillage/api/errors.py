"""Errors in OpenAI's shape, so that every client library raises its usual exception.

The official SDKs map status codes to exception classes (401 AuthenticationError,
403 PermissionDeniedError, 404 NotFoundError, 429 RateLimitError...) and read
`error.message`; a gateway that answers anything else breaks their retry logic.
"""

from __future__ import annotations

import orjson


class ApiError(Exception):
    """An error the client caused or must know about; never carries a traceback."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


def error_body(
    message: str, *, type: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code=code)


def unauthorized(message: str, code: str = "invalid_api_key") -> ApiError:
    return ApiError(
        401,
        message,
        type="authentication_error",
        code=code,
        headers={"www-authenticate": 'Bearer realm="aiguillage"'},
    )


def forbidden(message: str, code: str = "model_not_allowed") -> ApiError:
    return ApiError(403, message, type="permission_error", code=code)


def not_found(message: str, *, param: str | None = None, code: str = "model_not_found") -> ApiError:
    return ApiError(404, message, type="invalid_request_error", param=param, code=code)


def bad_gateway(message: str, code: str = "upstream_error") -> ApiError:
    return ApiError(502, message, type="upstream_error", code=code)


def unavailable(
    message: str, code: str = "no_backend_available", retry_after_s: int = 5
) -> ApiError:
    return ApiError(
        503,
        message,
        type="service_unavailable",
        code=code,
        headers={"retry-after": str(retry_after_s)},
    )


def gateway_timeout(message: str, code: str = "upstream_timeout") -> ApiError:
    return ApiError(504, message, type="upstream_timeout", code=code)


def require_media_type(content_type: str, expected: str, how: str) -> None:
    """A 415 unless the Content-Type's media type is `expected`; `how` says what to send."""
    if content_type.split(";", 1)[0].strip().lower() != expected:
        raise ApiError(
            415,
            how + (f" (got '{content_type}')." if content_type else "."),
            type="invalid_request_error",
            code="unsupported_media_type",
        )
