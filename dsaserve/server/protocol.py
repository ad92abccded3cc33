"""OpenAI request models (pydantic, strict) and the OpenAI-style error body.

Requests are validated from the raw JSON bytes in strict mode, so a wrong type (``"max_tokens": "5"``)
is an error instead of being coerced. Range checks that need no model knowledge live here; checks that
need the model (context length, vocabulary, model name, chat template) live in ``app.py``.
Unknown fields are accepted and ignored, like the OpenAI API does for forward compatibility.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

MAX_LOGPROBS = 20


class RequestError(Exception):
    """A bad request: becomes HTTP ``status`` with an OpenAI-style error body naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None             # extension
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False             # extension
    stop_token_ids: list[int] | None = None  # extension

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"max_tokens must be at least 1, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        # JSON numbers such as 1e400 parse as infinity (and NaN / Infinity literals are accepted)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:  # also rejects NaN and infinities
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {v}")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}; send several requests instead")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v: list[int] | None) -> list[int] | None:
        # the upper bound (the model's vocabulary) is checked in app.py
        bad = [t for t in v or [] if t < 0]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {bad[0]}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("presence/frequency penalties are not supported; leave them at 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    def check(self) -> None:
        """Cross-field checks (raise RequestError naming the field)."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if len(v) == 0:
                raise ValueError("prompt is empty")
            if isinstance(v[0], (str, list)):
                if len(v) != 1:
                    raise ValueError(f"only one prompt per request is supported, got {len(v)}")
                v = v[0]
        if len(v) == 0:
            raise ValueError("prompt is empty")
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("prompt token ids must be >= 0")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {v}")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("best_of is not supported (only 1)")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: str

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"response_format type {v!r} is not supported (only 'text')")
        return v


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must contain at least one message")
        return v

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"max_completion_tokens must be at least 1, got {v}")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {v}")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        if v:
            raise ValueError("tools are not supported")
        return v

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")


_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _json_hint(body) -> str:
    """Why a body failed to parse, when the parser's own words ("unexpected end of hex escape") do not say."""
    if not isinstance(body, (bytes, bytearray)):
        return ""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f" (the body is not UTF-8: byte 0x{body[e.start]:02x} at offset {e.start}; send UTF-8 text)"
    # a \uD800-\uDFFF escape not forming a high+low pair: it encodes no character, so no prompt can hold it
    for m in _LONE_SURROGATE.finditer(body):
        code = int(m.group()[2:], 16)
        nxt = body[m.end():m.end() + 6]
        paired = code < 0xDC00 and re.fullmatch(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}", nxt) is not None
        preceded = code >= 0xDC00 and re.search(rb"\\u[dD][89abAB][0-9a-fA-F]{2}$", body[:m.start()]) is not None
        if not (paired or preceded):
            return (f" (the escape {m.group().decode()} at offset {m.start()} is a lone UTF-16 surrogate, which is "
                    "not a character: strings must be valid Unicode)")
    return ""


def _loc_to_param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def request_error_from_validation(exc: ValidationError, model_cls: type[BaseModel]) -> RequestError:
    """Turn a pydantic error into one RequestError naming the offending field (OpenAI style)."""
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        msg = next(e["msg"] for e in errors if e["type"] == "json_invalid").removeprefix("Invalid JSON: ")
        body = next((e.get("input") for e in errors if e["type"] == "json_invalid"), b"")
        return RequestError(f"The request body is not valid JSON: {msg}{_json_hint(body)}", None)
    first = errors[0]
    if not first["loc"]:
        return RequestError(f"The request body must be a JSON object: {first['msg']}", None)
    # Errors of one field (several when a union's members all failed): keep the location prefix they
    # share, dropping union member tags such as 'list[int]'.
    field_name = first["loc"][0]
    same = [tuple(e["loc"]) for e in errors if e["loc"] and e["loc"][0] == field_name]
    prefix = list(same[0])
    for loc in same[1:]:
        n = 0
        while n < min(len(prefix), len(loc)) and prefix[n] == loc[n]:
            n += 1
        prefix = prefix[:n]
    param = _loc_to_param(tuple(p for p in prefix if isinstance(p, int) or "[" not in str(p)
                                and p not in ("str", "int", "float", "bool", "function-after")))
    if first["type"] == "missing":
        return RequestError(f"'{param}' is a required field", param)
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if len(same) > 1 and first["type"].endswith("_type"):
        # A union whose members all failed: name the accepted types (the tags right after the prefix).
        tags = list(dict.fromkeys(str(loc[len(prefix)]) for loc in same if len(loc) > len(prefix)))
        msg = f"'{param}' has the wrong type (expected one of: {', '.join(tags)}; got {first.get('input')!r})"
    elif first["type"].endswith("_type") or first["type"] in ("literal_error", "extra_forbidden"):
        msg = f"'{param}': {msg} (got {first.get('input')!r})"
    else:
        msg = f"'{param}': {msg}"
    return RequestError(msg, param)
