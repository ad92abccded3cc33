"""Chat formats and output parsers of the models served (issue 16 item 4: tool calls and reasoning).

How it plugs into the server (the wiring is not done here):

1. ``dsaserve serve`` gains ``--tool-call-parser`` and ``--reasoning-parser`` (default ``auto``: from
   ``config.model_type`` via :func:`resolve`; ``none`` turns a part off). Unknown names fail at start-up.
2. Chat rendering: a request with ``tools`` (or a thinking switch in ``chat_template_kwargs``, read by
   :func:`thinking_from_request`) is rendered by the model's chat format: DeepSeek-V3.2 always through
   :class:`DeepSeekV32ChatFormat` (it publishes a Python encoder, not a template); GLM-5 through the
   checkpoint's own Jinja template when it has one (messages passed through :func:`messages_for_jinja`,
   ``tools`` and ``enable_thinking`` as template variables), else :class:`GlmChatFormat`. A
   :class:`ChatFormatError` becomes HTTP 400 naming the message.
3. Output: per chat request one :func:`make_output_parser` (given the rendered prompt, so it knows whether
   the output starts inside ``<think>``). Streaming: feed each detokenized text delta, send
   ``ParsedDelta.to_openai_delta()`` as the chunk's ``delta`` when not empty, call ``finish()`` at the end
   and send what it returns before the finish chunk. Non-streaming: ``parse(text)`` and
   ``ParsedMessage.to_openai_message()``. A response with tool calls finishes with ``"tool_calls"``.
   The detokenizer must keep the markup (``<think>``, ``<tool_call>``, ``<｜DSML｜...``): decode with
   special tokens kept for those ids if a tokenizer marks them special.
"""

from dsaserve.server.parsers.base import (
    ChatFormatError,
    ParsedDelta,
    ParsedMessage,
    ToolCall,
    ToolCallDelta,
    new_tool_call_id,
)
from dsaserve.server.parsers.deepseek_v32 import DeepSeekV32ChatFormat, DeepSeekV32ToolParser
from dsaserve.server.parsers.glm import GlmChatFormat, GlmToolParser, messages_for_jinja
from dsaserve.server.parsers.output import ChatOutputParser
from dsaserve.server.parsers.reasoning import ThinkReasoningParser
from dsaserve.server.parsers.registry import (
    CHAT_FORMATS,
    MODEL_DEFAULTS,
    REASONING_PARSERS,
    TOOL_PARSERS,
    get_chat_format,
    make_output_parser,
    markup,
    resolve,
    thinking_from_request,
)

__all__ = [
    "CHAT_FORMATS", "MODEL_DEFAULTS", "REASONING_PARSERS", "TOOL_PARSERS", "ChatFormatError", "ChatOutputParser",
    "DeepSeekV32ChatFormat", "DeepSeekV32ToolParser", "GlmChatFormat", "GlmToolParser", "ParsedDelta",
    "ParsedMessage", "ThinkReasoningParser", "ToolCall", "ToolCallDelta", "get_chat_format", "make_output_parser",
    "markup", "messages_for_jinja", "new_tool_call_id", "resolve", "thinking_from_request",
]
