"""Errors in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.

Every error the app returns goes through `APIError` (or is converted to it by the
exception handlers installed on the FastAPI app), so clients always get the envelope and
never Serve's or FastAPI's own bodies (e.g. a bare 422)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return envelope(self.message, self.type, self.param, self.code)


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(message: str, param: str | None = "messages") -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def unauthorized() -> APIError:
    return APIError(
        401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key"
    )


def body_too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than the limit of {limit} bytes (server.max_request_body_bytes).",
        code="request_too_large",
    )


def queue_full(retry_after_s: int) -> APIError:
    return APIError(
        503,
        "The server is overloaded (request queue full); retry later.",
        type="server_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def internal_error(message: str = "Internal server error.", code: str = "internal_error") -> APIError:
    return APIError(500, message, type="server_error", code=code)


def limit_exceeded(what: str, key: str, limit: int, param: str | None = None) -> APIError:
    """A request asking for more work than a `limits.*` key allows."""
    return APIError(
        400, f"{what} exceeds the limit of {limit} (limits.{key})", param=param, code="limit_exceeded"
    )


def _location(loc: tuple) -> str | None:
    # pydantic adds the union member tried (e.g. 'str', 'list[int]') to loc: keep field names
    kept = [
        p
        for p in loc
        if not (
            isinstance(p, str)
            and ("[" in p or p in ("str", "int", "float", "bool", "function-after", "function-before"))
        )
    ]
    return ".".join(str(p) for p in kept if p != "body") or None


def from_validation_error(err: ValidationError, prefix: tuple = (), max_details: int = 1) -> APIError:
    """The first problems of a pydantic error (at most `max_details`), as a 400 naming the
    parameter; the others are only counted, so a body with a million bad items costs no
    more to answer than one with a single bad item."""
    count = err.error_count()
    shown = err.errors(include_url=False, include_context=False, include_input=False)[:max_details]
    parts = []
    for e in shown:
        param = _location((*prefix, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "Unrecognized request argument supplied"
        if e["type"] == "missing":
            msg = "Missing required parameter"
        parts.append(f"{param}: {msg}" if param else msg)
    more = count - len(shown)
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    first = shown[0]
    return APIError(
        400,
        "; ".join(parts) + tail,
        param=_location((*prefix, *first["loc"])),
        code="invalid_value" if first["type"] != "missing" else "missing_required_parameter",
    )
