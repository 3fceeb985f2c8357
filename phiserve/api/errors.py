"""OpenAI's error envelope: {"error": {"message", "type", "param", "code"}} with the right HTTP status."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _param_from_loc(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "list[str]", "function-after", "function-before") or "[" in str(p) or str(p).startswith(("constrained", "json-or")):
            continue  # pydantic's union/validator branch labels, not user-facing names
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    # A union (e.g. stop: str | list[str]) reports one error per branch; the branch whose type
    # matched the input says what is actually wrong ("at most 4 items", not "should be a string").
    same_param = [e for e in errors if _param_from_loc(tuple(e.get("loc", ()))) == _param_from_loc(tuple(first.get("loc", ())))]
    first = next((e for e in same_param if not str(e.get("type", "")).endswith("_type")), first)
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
    param = _param_from_loc(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = f"Missing required parameter: '{param}'."
    elif param:
        value = first.get("input")
        shown = json.dumps(value, default=str)[:200] if value is not None and not isinstance(value, dict | list) else None
        msg = f"Invalid value for '{param}': {msg}" + (f" (got {shown})." if shown else ".")
    return OpenAIError(400, msg, param=param, code="invalid_value" if first.get("type") != "missing" else "missing_required_parameter")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), type=kind, code=code).response()

    @app.exception_handler(Exception)
    async def _fault(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled server fault")
        return OpenAIError(500, "The server had an error while processing your request.", type="server_error").response()
