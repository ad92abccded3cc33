"""Tokenizer of a checkpoint folder: ``tokenizer.json`` (HF ``tokenizers``) + chat template.

Reads ``tokenizer.json``, ``tokenizer_config.json`` (bos/eos tokens, ``chat_template``; a separate
``chat_template.jinja`` as written by transformers 5 is read too) and ``generation_config.json``
(extra eos ids). Chat templates are rendered in a sandboxed Jinja environment with transformers' helpers
(``raise_exception``, a ``tojson`` filter taking ensure_ascii / indent / separators / sort_keys).
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """A tokenizer folder or chat request that cannot be handled; the message says why."""


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_text(tok: Any) -> str | None:
    """tokenizer_config spells special tokens as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    ``bos_token_id`` may be None (no bos); ``eos_token_ids`` lists every id that ends generation.
    """

    def __init__(self, tokenizer: _HFTokenizer, *, bos_token: str | None = None, eos_tokens: list[str] = (),
                 extra_eos_ids: list[int] = (), chat_template: str | None = None):
        self._tok = tokenizer
        self.bos_token = bos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token = eos_tokens[0] if eos_tokens else None
        ids: list[int] = []
        for t in eos_tokens:
            i = tokenizer.token_to_id(t)
            if i is None:
                raise TokenizerError(f"eos token {t!r} is not in the tokenizer vocabulary")
            ids.append(i)
        for i in extra_eos_ids:
            if int(i) not in ids:
                ids.append(int(i))
        self.eos_token_ids: list[int] = ids
        self.chat_template = chat_template
        self._compiled = None
        self._special: set[int] | None = None   # ids of special added tokens (skipped when decoding)
        self._kept: set[int] = set()            # special ids decoded anyway: markup output parsers read

    def keep_special_tokens(self, markers) -> list[str]:
        """Keep the special tokens whose text contains one of ``markers`` (e.g. ``<think>``, ``<tool_call>``)
        in ``decode(..., skip_special_tokens=True)``: tool-call and reasoning parsers read that markup, and a
        tokenizer may mark it special. Returns the tokens kept."""
        if self._special is None:
            self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        kept = {i for i in self._special if any(m in (self._tok.id_to_token(i) or "") for m in markers)}
        self._kept |= kept
        return sorted(self._tok.id_to_token(i) for i in kept)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str) -> "Tokenizer | None":
        """Load from a checkpoint folder; None when it has no ``tokenizer.json``."""
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        try:
            tok = _HFTokenizer.from_file(path)
        except Exception as e:
            raise TokenizerError(f"cannot read {path}: {e}") from e
        cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        gen = _read_json(os.path.join(model_dir, "generation_config.json"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if not template and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        eos = _token_text(cfg.get("eos_token"))
        gen_eos = gen.get("eos_token_id")
        gen_eos = [] if gen_eos is None else ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos))
        bos = _token_text(cfg.get("bos_token"))
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = tok.id_to_token(gen["bos_token_id"])
        return cls(tok, bos_token=bos, eos_tokens=[eos] if eos else [], extra_eos_ids=gen_eos,
                   chat_template=template or None)

    # ---- text <-> ids ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included (may be < the model's vocab_size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (e.g. from a chat template) are
        recognized. ``add_bos`` prepends bos unless the text already starts with it (no double bos)."""
        # encode_batch releases the GIL while it works (encode does not): a long prompt tokenized in a
        # server thread must not freeze the event loop (measured: 1 MB of text holds it for 2 s otherwise).
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens and self._kept:
            ids = [i for i in ids if i in self._kept or i not in self._special]
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- chat ----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) to the prompt text."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (no 'chat_template' in tokenizer_config.json "
                                 "and no chat_template.jinja): send a plain prompt (completions) instead")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"chat template failed: {e}") from e


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """transformers' ``tojson`` filter: plain ``json.dumps`` (Jinja's own escapes HTML, which changes the
    prompt text of templates that serialize tools or arguments)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=tuple(separators) if separators is not None else None, sort_keys=sort_keys)


def _compile_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Same whitespace handling and helpers as transformers, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def render_chat_template(source: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                         add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Render a chat template given as text (a ``--chat-template`` file) in the same sandbox."""
    try:
        return _compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token, **kwargs)
    except TokenizerError:
        raise
    except Exception as e:
        raise TokenizerError(f"chat template failed: {e}") from e
