"""Chat formats, tool-call parsers and reasoning parsers by name, and the defaults of each model type.

Names follow the ones vLLM and SGLang users already pass: ``--tool-call-parser deepseek_v32 | glm47 | glm45``
(glm45 and glm47 are one parser: it reads both layouts) and ``--reasoning-parser deepseek_v32 | glm45``.
``--tool-call-parser auto`` / ``--reasoning-parser auto`` take the model type's defaults (MODEL_DEFAULTS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dsaserve.server.parsers.base import THINK_START, IdFactory, new_tool_call_id
from dsaserve.server.parsers.deepseek_v32 import DeepSeekV32ChatFormat, DeepSeekV32ToolParser
from dsaserve.server.parsers.glm import GlmChatFormat, GlmToolParser
from dsaserve.server.parsers.output import ChatOutputParser, ToolParser
from dsaserve.server.parsers.reasoning import ThinkReasoningParser

TOOL_PARSERS: dict[str, Callable[..., ToolParser]] = {
    "deepseek_v32": DeepSeekV32ToolParser,
    "glm45": GlmToolParser,
    "glm47": GlmToolParser,
}
# Both models mark reasoning with <think>...</think>; the names exist so each model keeps its usual flag.
REASONING_PARSERS: dict[str, Callable[[bool], ThinkReasoningParser]] = {
    "deepseek_v32": ThinkReasoningParser,
    "glm45": ThinkReasoningParser,
}
CHAT_FORMATS = {"deepseek_v32": DeepSeekV32ChatFormat(), "glm47": GlmChatFormat()}
# Text the parsers read; a tokenizer may spell it with special tokens, which decoding must then keep.
MARKUP = {"deepseek_v32": ("｜DSML｜",), "glm45": ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                                               "<arg_value>", "</arg_value>")}
MARKUP["glm47"] = MARKUP["glm45"]
REASONING_MARKUP = ("<think>", "</think>")


@dataclass(frozen=True)
class ModelParsers:
    """The parser and chat-format names a model type uses by default."""

    tool_call_parser: str
    reasoning_parser: str
    chat_format: str


MODEL_DEFAULTS = {
    "deepseek_v32": ModelParsers("deepseek_v32", "deepseek_v32", "deepseek_v32"),
    "glm_moe_dsa": ModelParsers("glm47", "glm45", "glm47"),
}


def _pick(table: dict, name: str, flag: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {flag} {name!r}: choose one of {', '.join(sorted(table))}") from None


def resolve(model_type: str | None, tool_call_parser: str | None = "auto", reasoning_parser: str | None = "auto",
            chat_format: str | None = "auto") -> tuple[str | None, str | None, str | None]:
    """Names after applying ``auto`` (the model type's default; None for a model type without one) and
    checking explicit names; None or "none" turns a part off."""
    defaults = MODEL_DEFAULTS.get(model_type or "")
    out = []
    for value, table, flag, attr in ((tool_call_parser, TOOL_PARSERS, "--tool-call-parser", "tool_call_parser"),
                                     (reasoning_parser, REASONING_PARSERS, "--reasoning-parser", "reasoning_parser"),
                                     (chat_format, CHAT_FORMATS, "chat format", "chat_format")):
        if value in (None, "none"):
            out.append(None)
        elif value == "auto":
            out.append(getattr(defaults, attr) if defaults else None)
        else:
            _pick(table, value, flag)
            out.append(value)
    return out[0], out[1], out[2]


def markup(tool_call_parser: str | None, reasoning_parser: str | None) -> tuple[str, ...]:
    """The markup strings the configured parsers read (tokens containing them must not be skipped)."""
    return (MARKUP.get(tool_call_parser or "", ()) + (REASONING_MARKUP if reasoning_parser else ()))


def get_chat_format(name: str):
    return _pick(CHAT_FORMATS, name, "chat format")


def make_output_parser(tool_call_parser: str | None, reasoning_parser: str | None, *, prompt: str,
                       tools: list[dict] | None = None, id_factory: IdFactory = new_tool_call_id) -> ChatOutputParser:
    """The output parser of one chat request. Tool calls are parsed only when the request sent tools;
    reasoning starts open when the rendered ``prompt`` ends with ``<think>`` (thinking mode)."""
    reasoning = (_pick(REASONING_PARSERS, reasoning_parser, "--reasoning-parser")(prompt.endswith(THINK_START))
                 if reasoning_parser else None)
    tool = (_pick(TOOL_PARSERS, tool_call_parser, "--tool-call-parser")(tools, id_factory=id_factory)
            if tool_call_parser and tools else None)
    return ChatOutputParser(reasoning, tool)


def thinking_from_request(chat_template_kwargs: dict | None) -> bool | None:
    """Thinking mode asked for in ``chat_template_kwargs`` (DeepSeek clients send ``thinking``, GLM clients
    ``enable_thinking``); None when neither is given (the model's default)."""
    kw = chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kw:
            return bool(kw[key])
    return None
