"""Structured output: grammar-constrained sampling through ``xgrammar`` (JSON object, JSON schema, regex, EBNF).

How it is wired (this module has no engine imports; the scheduler and the server use it):

* The server turns a request's ``response_format`` (``json_object`` / ``json_schema``) or the ``regex`` /
  ``grammar`` extensions into a :class:`GrammarSpec` (:meth:`GrammarSpec.from_request`) and rejects a bad
  spec with HTTP 400 before the request is queued: :meth:`GrammarCache.compile` raises
  :class:`StructuredOutputError` naming the problem.
* The engine (rank 0, which owns scheduling and detokenization) owns one :class:`GrammarCache` per model
  (compiled grammars are cached by spec, so 50 requests with one schema compile it once) and one
  :class:`RequestMatcher` per constrained sequence. When the scheduler plans a sequence's next token it
  fills that sequence's next-token mask with :meth:`RequestMatcher.fill_bitmask` (``words = ceil(vocab /
  32)`` int32, bit ``i % 32`` of word ``i // 32`` set = token ``i`` allowed: 16 KB for a 129K vocabulary)
  into ``SampleSpec.allowed_bitmask``, so it rides in the step plan to the rank that samples. The
  sampler's first processor applies it with :func:`apply_token_bitmask` to the raw logits BEFORE
  logit_bias / penalties / temperature / top-k / top-p, so every later step only renormalizes over allowed
  tokens. Sequences without a grammar carry no mask (no cost).
* When the sampled token comes back, rank 0 calls :meth:`RequestMatcher.accept`; when
  :meth:`RequestMatcher.is_terminated` turns true (the grammar is complete and a stop token was accepted)
  the request finishes with ``finish_reason="stop"``. A request that hits ``max_tokens`` first ends
  incomplete (``"length"``), as in the OpenAI API.
* Mask filling is host work for the next step; it overlaps the current step's GPU work and never needs
  a device sync (the mask is built on the host and sent with the plan).

The vocabulary handed to xgrammar is the model's (``config.vocab_size``, the logits width), which may
exceed the tokenizer's: ids past the tokenizer and the tokenizer's special tokens (which the detokenizer
drops, so they could never spell grammar text) are never allowed; stop tokens are allowed once the
grammar is complete.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from dsaserve.runtime.logits_processors import apply_token_bitmask

__all__ = ["GRAMMAR_KINDS", "GrammarCache", "GrammarSpec", "RequestMatcher", "StructuredOutputError",
           "allocate_bitmask", "apply_token_bitmask", "bitmask_words", "build_tokenizer_info"]

MASK_DTYPE = torch.int32
BITS_PER_WORD = 32
GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "grammar")


class StructuredOutputError(ValueError):
    """A grammar spec that cannot be used (bad schema, regex or EBNF); the message says why."""


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words of one request's token bitmask."""
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A ``[rows, words]`` int32 host tensor with every token allowed (all bits set)."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=MASK_DTYPE)


# ---- specs -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to; hashable, so it keys the compiled-grammar cache.

    ``kind`` is one of GRAMMAR_KINDS; ``source`` is the canonical JSON schema text (sorted keys, so equal
    schemas share one cache entry), the regex, the EBNF grammar, or "" for ``json_object``.
    """

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise StructuredOutputError(f"unknown structured output kind {self.kind!r}: "
                                        f"use one of {', '.join(GRAMMAR_KINDS)}")

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "GrammarSpec":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise StructuredOutputError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise StructuredOutputError(f"json_schema must be a JSON object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, sort_keys=True, ensure_ascii=False))

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        if not isinstance(pattern, str) or not pattern:
            raise StructuredOutputError("regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, ebnf: str) -> "GrammarSpec":
        if not isinstance(ebnf, str) or not ebnf.strip():
            raise StructuredOutputError("grammar must be a non-empty EBNF string (with a 'root' rule)")
        return cls("grammar", ebnf)

    @classmethod
    def from_request(cls, response_format: dict | None = None, regex: str | None = None,
                     grammar: str | None = None) -> "GrammarSpec | None":
        """The spec of an OpenAI request: ``response_format`` ({"type": "text" | "json_object" |
        "json_schema", "json_schema": {"name", "schema", "strict"}}) or one of the ``regex`` / ``grammar``
        extensions; None when the output is unconstrained. More than one constraint is an error."""
        given = [name for name, v in (("response_format", response_format), ("regex", regex), ("grammar", grammar))
                 if v is not None and not (name == "response_format" and v.get("type") == "text")]
        if len(given) > 1:
            raise StructuredOutputError(f"give at most one output constraint, got {', '.join(given)}")
        if regex is not None:
            return cls.regex(regex)
        if grammar is not None:
            return cls.grammar(grammar)
        if response_format is None:
            return None
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            body = response_format.get("json_schema")
            if not isinstance(body, dict) or "schema" not in body:
                raise StructuredOutputError("response_format json_schema needs {'json_schema': {'name': ..., "
                                            "'schema': {...}}}")
            return cls.json_schema(body["schema"])
        raise StructuredOutputError(f"response_format type {kind!r} is not supported: use text, json_object or "
                                    f"json_schema")


def _bounded_strings_as_patterns(node: Any) -> Any:
    """Rewrite ``{"type": "string", "minLength": m, "maxLength": n}`` (no pattern) as the pattern
    ``^[^\\ud800-\\udfff]{m,n}$``: same language, but xgrammar 0.2.9 compiles the length-bounded form to a
    character class that admits raw control characters (invalid JSON) and no escapes (its issue #800), while
    its pattern path emits proper JSON string characters and escapes. The class excludes the surrogates:
    ``[\\s\\S]`` also admits UTF-8-encoded surrogates (bytes ED A0..BF ..), which are no characters and
    decode to one U+FFFD per byte, breaking the length bound. Known gap (xgrammar 0.2.9 turns a range's lower
    bound into loose UTF-8): overlong sequences (E0 80..9F .., F0 80..8F ..) stay possible, so a non-ASCII
    bounded string from a model that emits invalid UTF-8 can still decode longer than its bound; a pattern
    over ASCII (``^[a-z]{1,8}$``) is exact. Other schema nodes are kept as they are."""
    if isinstance(node, list):
        return [_bounded_strings_as_patterns(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_strings_as_patterns(v) for k, v in node.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and "pattern" not in out and "format" not in out:
        lo, hi = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = "^[^\\ud800-\\udfff]{%d,%s}$" % (lo, "" if hi is None else int(hi))
    return out


# ---- tokenizer info ----------------------------------------------------------------------------------
def build_tokenizer_info(hf_tokenizer, *, model_vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's view of a ``tokenizers.Tokenizer``: the vocabulary padded to ``model_vocab_size`` (the
    logits width), special added tokens blanked (never allowed as grammar text: the detokenizer skips
    them) and ``stop_token_ids`` (the eos ids) allowed once the grammar is complete."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    if not stop_token_ids:
        raise StructuredOutputError("structured output needs at least one stop (eos) token id")
    vocab = hf_tokenizer.get_vocab(with_added_tokens=True)  # token text -> id
    tok_vocab = max(vocab.values()) + 1
    if model_vocab_size < tok_vocab:
        raise StructuredOutputError(f"model vocab_size {model_vocab_size} is smaller than the tokenizer's "
                                    f"{tok_vocab} tokens")
    # xgrammar derives the vocabulary encoding (byte-level, byte-fallback, raw) from the tokenizer.json.
    detected = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer),
                                                  vocab_size=model_vocab_size, stop_token_ids=stop_token_ids)
    special = {i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
    encoded = [""] * model_vocab_size
    for text, i in vocab.items():
        if i not in special:
            encoded[i] = text
    return xgr.TokenizerInfo(encoded, vocab_type=detected.vocab_type, vocab_size=model_vocab_size,
                             stop_token_ids=list(stop_token_ids), add_prefix_space=detected.add_prefix_space)


# ---- compiled grammars + per-request matchers -------------------------------------------------------------
class GrammarCache:
    """Compiles :class:`GrammarSpec` s for one tokenizer and keeps the last ``max_entries`` (LRU).

    Thread-safe: the server may compile (to validate) while the engine thread creates matchers.
    """

    def __init__(self, tokenizer_info, *, max_entries: int = 256, max_threads: int = 4):
        import xgrammar as xgr

        self.tokenizer_info = tokenizer_info
        self.vocab_size = tokenizer_info.vocab_size
        self.max_entries = max_entries
        self._compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_model_dir(cls, model_dir: str, model_vocab_size: int, **kwargs: Any) -> "GrammarCache":
        """Build from a checkpoint folder (``tokenizer.json`` + the eos ids the tokenizer module reads)."""
        import os

        from tokenizers import Tokenizer as HFTokenizer

        from dsaserve.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(model_dir)
        if tok is None:
            raise StructuredOutputError(f"{model_dir} has no tokenizer.json: structured output needs the tokenizer")
        hf = HFTokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        info = build_tokenizer_info(hf, model_vocab_size=model_vocab_size, stop_token_ids=tok.eos_token_ids)
        return cls(info, **kwargs)

    def compile(self, spec: GrammarSpec):
        """The compiled grammar of ``spec`` (cached); raises StructuredOutputError for a bad spec."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return hit
        compiled = self._compile_uncached(spec)  # outside the lock: compiling a big schema takes a while
        with self._lock:
            self.misses += 1
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return compiled

    def _compile_uncached(self, spec: GrammarSpec):
        try:
            if spec.kind == "json_object":
                # OpenAI's JSON mode promises a JSON object; xgrammar's builtin JSON grammar admits any value
                # (a bare ``[false]`` too), so compile the schema of "any object" instead
                return self._compiler.compile_json_schema('{"type": "object"}')
            if spec.kind == "json_schema":
                schema = _bounded_strings_as_patterns(json.loads(spec.source))
                return self._compiler.compile_json_schema(json.dumps(schema))
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.source)
            return self._compiler.compile_grammar(spec.source)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError subclasses with a reason
            raise StructuredOutputError(f"cannot compile the {spec.kind} constraint: {e}") from None

    def matcher(self, spec: GrammarSpec) -> "RequestMatcher":
        """A fresh matcher for one request."""
        return RequestMatcher(self.compile(spec), self.vocab_size)


class RequestMatcher:
    """The grammar state of one request: which tokens may come next, and what was accepted so far."""

    def __init__(self, compiled_grammar, vocab_size: int):
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self._matcher = xgr.GrammarMatcher(compiled_grammar)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write this request's next-token mask into ``bitmask[row]`` (an int32 host tensor [rows, words])."""
        if bitmask.dtype != MASK_DTYPE or bitmask.device.type != "cpu" or bitmask.shape[-1] != self.words:
            raise ValueError(f"bitmask must be a CPU int32 tensor [rows, {self.words}], got "
                             f"{bitmask.dtype} {tuple(bitmask.shape)} on {bitmask.device}")
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; a token the mask did not allow is a bug upstream, so it raises."""
        if not self._matcher.accept_token(int(token_id)):
            raise StructuredOutputError(f"token {token_id} is not allowed by the grammar here (was the mask applied?)")

    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""
        return self._matcher.is_terminated()
