"""Chat requests -> prompt text (the model's chat format or a Jinja template), and each response's output
parser (tool calls and reasoning), for the model type the server runs.

Rendering, in order of precedence:
1. ``--chat-template FILE``: that Jinja template (sandboxed, transformers' helpers), given ``tools`` and the
   request's ``chat_template_kwargs``;
2. DeepSeek-V3.2 (``deepseek_v32``): its chat format (``parsers.DeepSeekV32ChatFormat``: the model
   publishes a Python encoder, not a template) whenever the request uses tools, tool messages, reasoning
   content or a thinking switch, or the checkpoint has no template;
3. the checkpoint's Jinja template (GLM-5 publishes one), messages passed through ``messages_for_jinja``
   with ``tools`` and ``chat_template_kwargs`` (``enable_thinking`` too when the client said ``thinking``);
4. the model type's chat format (GLM without a template), else HTTP 400 "no chat template".

Output: ``--tool-call-parser`` / ``--reasoning-parser`` (``auto``: from the model type, ``none``: off) pick
the parsers; a response gets a ``ChatOutputParser`` when either is on (tool calls are parsed only when the
request sent tools and tool_choice is not "none"). Markup those parsers read may be special tokens in a
tokenizer: ``ChatRenderer`` makes the tokenizer keep them when decoding output.
"""

from __future__ import annotations

import logging
from typing import Any

from dsaserve.tokenizer import TokenizerError, render_chat_template

from .parsers import (ChatFormatError, ChatOutputParser, get_chat_format, make_output_parser, markup,
                      messages_for_jinja, resolve, thinking_from_request)
from .protocol import RequestError

log = logging.getLogger("dsaserve.server")

PARSER_CHOICES = ("auto", "none")


class ChatRenderer:
    """Renders chat requests and makes output parsers for one model (see the module docstring)."""

    def __init__(self, tokenizer, model_type: str | None, *, chat_template: str | None = None,
                 tool_call_parser: str | None = "auto", reasoning_parser: str | None = "auto"):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.tool_call_parser, self.reasoning_parser, fmt = resolve(model_type, tool_call_parser, reasoning_parser)
        self.chat_format = get_chat_format(fmt) if fmt else None
        keep = getattr(tokenizer, "keep_special_tokens", None)
        wanted = markup(self.tool_call_parser, self.reasoning_parser)
        if keep is not None and wanted:
            kept = keep(wanted)
            if kept:
                log.info("decoding keeps the special tokens %s (the output parsers read them)", ", ".join(kept))

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text of a chat; RequestError (HTTP 400 on ``messages``) when it cannot be rendered."""
        if self.tokenizer is None:
            raise RequestError("This model has no tokenizer, so chat is not available; use /v1/completions "
                               "with token ids", "messages")
        kwargs = dict(template_kwargs or {})
        thinking = thinking_from_request(kwargs)
        template = getattr(self.tokenizer, "chat_template", None)
        uses_format_features = bool(tools) or thinking is not None or any(
            m.get("tool_calls") or m["role"] == "tool" or m.get("reasoning_content") is not None for m in messages)
        try:
            if self.chat_template:
                return render_chat_template(self.chat_template, messages_for_jinja(messages), tools=tools,
                                            bos_token=getattr(self.tokenizer, "bos_token", None) or "",
                                            eos_token=getattr(self.tokenizer, "eos_token", None) or "", **kwargs)
            if self.chat_format is not None and (not template or (self.chat_format.name == "deepseek_v32"
                                                                  and uses_format_features)):
                return self.chat_format.render(messages, tools=tools, thinking=thinking)
            if not template:
                raise RequestError("This model has no chat template; start the server with --chat-template FILE "
                                   "or use /v1/completions", "messages")
            if thinking is not None:
                kwargs.setdefault("enable_thinking", thinking)
            return self.tokenizer.apply_chat_template(messages_for_jinja(messages), add_generation_prompt=True,
                                                      **({"tools": tools} if tools else {}), **kwargs)
        except RequestError:
            raise
        except (ChatFormatError, TokenizerError) as e:
            raise RequestError(f"The chat could not be rendered: {e}", "messages") from None
        except Exception as e:  # noqa: BLE001 - other template errors are the client's messages' problem too
            raise RequestError(f"The chat template could not render these messages: {e}", "messages") from None

    def encode(self, text: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token", None)
        # Templates and formats usually emit the BOS text themselves; do not add a second one.
        return self.tokenizer.encode(text, add_bos=not (bos and text.startswith(bos)))

    def output_parser(self, prompt: str, tools: list[dict] | None) -> ChatOutputParser | None:
        """The parser of one response (None when neither parser is on)."""
        if not (self.reasoning_parser or (self.tool_call_parser and tools)):
            return None
        return make_output_parser(self.tool_call_parser, self.reasoning_parser, prompt=prompt, tools=tools)
