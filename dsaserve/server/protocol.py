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
MAX_N = 128           # sequences per prompt (n)
MAX_PROMPTS = 256     # prompts in one /v1/completions request
MAX_CHOICES = 256     # prompts x n


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
    """``stream_options``: ``include_usage`` adds a final chunk with the token usage."""

    include_usage: bool = False


class ResponseFormat(_Strict):
    """OpenAI ``response_format``: text, json_object, or json_schema {"name", "schema", "strict"}."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None             # optional, as in vLLM / SGLang: the served model when left out
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
    repetition_penalty: float = 1.0      # extension
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False             # extension
    min_tokens: int = 0                  # extension
    stop_token_ids: list[int] | None = None  # extension
    response_format: ResponseFormat | None = None
    regex: str | None = None             # extension: the output matches this regular expression
    grammar: str | None = None           # extension: the output follows this EBNF grammar (GBNF style)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
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
        if not 1 <= v <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}, got {v}")
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
        if not -2.0 <= v <= 2.0:   # also rejects NaN and infinities
            raise ValueError(f"must be between -2 and 2, got {v}")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v: float) -> float:
        if not 0 < v <= 100:
            raise ValueError(f"repetition_penalty must be in (0, 100] (1 = off), got {v}")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"min_tokens must be >= 0, got {v}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        # the token ids' upper bound (the model's vocabulary) is checked in app.py
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (strings of digits), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias} for token {key}")
        return v

    def bias_by_id(self) -> dict[int, float] | None:
        return {int(k): float(b) for k, b in self.logit_bias.items()} if self.logit_bias else None

    def check(self) -> None:
        """Cross-field checks (raise RequestError naming the field)."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")
        if self.response_format is not None and self.response_format.type == "json_schema" and \
                not isinstance((self.response_format.json_schema or {}).get("schema"), dict):
            raise RequestError("response_format of type json_schema needs json_schema: {\"name\": ..., \"schema\": "
                               "{...}}", "response_format")


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
                if len(v) > MAX_PROMPTS:
                    raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
                for i, p in enumerate(v):
                    if len(p) == 0:
                        raise ValueError(f"prompt {i} is empty")
                    if isinstance(p, list) and any(t < 0 for t in p):
                        raise ValueError(f"prompt {i}: token ids must be >= 0")
                return v
        if len(v) == 0:
            raise ValueError("prompt is empty")
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("prompt token ids must be >= 0")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request (a batch, or one)."""
        p = self.prompt
        return list(p) if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {v}")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens must be at least 1 (0 only with echo, to score the prompt)", "max_tokens")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of must equal n ({self.n}): candidates are not ranked", "best_of")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise RequestError(f"prompts x n is {len(self.prompts()) * self.n}; at most {MAX_CHOICES} completions "
                               "per request", "n")


class TextPart(_Strict):
    """One text part of a message's content given as a list of parts."""

    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    """The function of a tool call: its name and arguments (a JSON string, or an object)."""

    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallItem(_Strict):
    """An assistant message's tool call (as the API returned it)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One message of a chat request."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None      # assistant
    tool_call_id: str | None = None                   # tool
    reasoning_content: str | None = None              # assistant (thinking models)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def to_dict(self) -> dict[str, Any]:
        """The message as chat formats and templates read it (content as text)."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            m["name"] = self.name
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            m["reasoning_content"] = self.reasoning_content
        return m


class FunctionDef(_Strict):
    """A function the model may call (``tools[].function``)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", v):
            raise ValueError(f"function names are 1-64 letters, digits, '_', '.', ':' or '-', got {v!r}")
        return v


class Tool(_Strict):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Strict):
    """``tool_choice`` naming one function: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: dict[str, str]


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None   # extension: e.g. {"thinking": true}

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

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools the model is told about: none when tool_choice is "none" (as OpenAI does)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0:
            raise RequestError("max_tokens must be at least 1, got 0", "max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.tool_choice is not None and self.tool_choice not in ("none", "auto") and not self.tools:
            raise RequestError("tool_choice needs tools", "tool_choice")
        if self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice):
            raise RequestError("tool_choice 'required' and a named function are not supported; use 'auto' (the "
                               "model decides) or 'none'", "tool_choice")


class TokenizeRequest(_Strict):
    """POST /tokenize: a prompt, or chat messages rendered as /v1/chat/completions renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = True        # prompt: prepend bos as completions do
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("give either prompt or messages", "prompt")


class DetokenizeRequest(_Strict):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]

    def check(self) -> None:
        if any(t < 0 for t in self.tokens):
            raise RequestError("tokens must be token ids >= 0", "tokens")


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
