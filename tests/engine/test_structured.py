"""Structured output (dsaserve/structured.py): bitmask application, the tiny tokenizer's vocabulary as xgrammar
sees it, and seeded random sampling under JSON schema / regex / EBNF constraints that must always validate."""

import json
import re

import pytest
import torch

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from dsaserve.checkpoint.tiny import TOKENIZER_VOCAB, make_tiny_checkpoint  # noqa: E402
from dsaserve.engine.structured import (  # noqa: E402
    GrammarCache,
    GrammarSpec,
    StructuredOutputError,
    _bounded_strings_as_patterns,
    allocate_bitmask,
    apply_token_bitmask,
    bitmask_words,
)
from dsaserve.tokenizer import Tokenizer  # noqa: E402

# Like the real checkpoints, the model's vocabulary is padded past the tokenizer's: padding ids must never be sampled
MODEL_VOCAB = TOKENIZER_VOCAB + 32

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "kind": {"enum": ["x", "y"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "ok", "tags", "kind"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_structured")), arch="deepseek_v32", seed=0,
                                vocab_size=MODEL_VOCAB)


@pytest.fixture(scope="module")
def cache(tiny_dir):
    return GrammarCache.from_model_dir(tiny_dir, MODEL_VOCAB)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


def sample_constrained(cache, spec, gen, max_tokens=400):
    """Random logits at temperature 1, masked by the grammar; returns (token ids without the stop token,
    terminated)."""
    matcher = cache.matcher(spec)
    mask = allocate_bitmask(1, cache.vocab_size)
    ids = []
    for _ in range(max_tokens):
        matcher.fill_bitmask(mask, 0)
        logits = torch.randn(1, cache.vocab_size, generator=gen)
        apply_token_bitmask(logits, mask)
        token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        assert token < TOKENIZER_VOCAB, f"sampled padding id {token}"
        matcher.accept(token)
        if matcher.is_terminated():
            return ids, True
        ids.append(token)
    return ids, False


# ---- bitmask -----------------------------------------------------------------------------------------
def reference_mask(logits, bitmask, allowed_vocab):
    out = logits.clone()
    for r in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            word = i // 32
            allowed = word < bitmask.shape[1] and (int(bitmask[r, word]) >> (i % 32)) & 1 and i < allowed_vocab
            if not allowed:
                out[r, i] = float("-inf")
    return out


@pytest.mark.parametrize("vocab,words,allowed_vocab", [(100, 4, 100), (100, 4, 77), (70, 3, 70), (130, 3, 130)])
def test_apply_token_bitmask_matches_bitwise_reference(vocab, words, allowed_vocab):
    g = torch.Generator().manual_seed(vocab + words)
    logits = torch.randn(3, vocab, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1  # a row with everything allowed
    expected = reference_mask(logits, bitmask, allowed_vocab)
    got = apply_token_bitmask(logits.clone(), bitmask, allowed_vocab=allowed_vocab)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    if vocab > words * 32:  # ids past the mask's words are disallowed, never read out of bounds
        assert torch.isinf(got[:, words * 32:]).all()


def test_apply_token_bitmask_agrees_with_xgrammar():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 200, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, bitmask_words(200)), generator=g, dtype=torch.int64).to(torch.int32)
    ours = apply_token_bitmask(logits.clone(), bitmask)
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, bitmask, backend="torch_native")
    assert torch.equal(ours, theirs)


def test_apply_token_bitmask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same number of rows"):
        apply_token_bitmask(torch.zeros(2, 64), allocate_bitmask(3, 64))
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask(torch.zeros(1, 64), torch.zeros(1, 2, dtype=torch.int64))


# ---- vocabulary ------------------------------------------------------------------------------------------
def test_padding_and_special_tokens_are_never_allowed(cache, tok):
    matcher = cache.matcher(GrammarSpec.json_object())
    mask = allocate_bitmask(1, MODEL_VOCAB)
    for text in ['{"', 'a', '": "', 'x']:  # inside a JSON string nearly every text token is allowed
        for t in tok.encode(text, add_bos=False):
            matcher.accept(t)
    matcher.fill_bitmask(mask, 0)
    allowed = ~torch.isinf(apply_token_bitmask(torch.zeros(1, MODEL_VOCAB), mask))[0]
    assert allowed.sum() > 300
    assert not allowed[TOKENIZER_VOCAB:].any(), "ids past the tokenizer vocabulary must be masked"
    for special in (0, 1, 2, 3, 4):  # bos, eos (grammar not complete yet), user, assistant, pad
        assert not allowed[special]


def test_json_object_accepts_a_document_then_only_eos(cache, tok):
    matcher = cache.matcher(GrammarSpec.json_object())
    for t in tok.encode('{"a": [1, 2]}', add_bos=False):
        matcher.accept(t)
    mask = allocate_bitmask(1, MODEL_VOCAB)
    matcher.fill_bitmask(mask, 0)
    allowed = ~torch.isinf(apply_token_bitmask(torch.zeros(1, MODEL_VOCAB), mask))[0]
    assert allowed[tok.eos_token_ids[0]]
    assert not matcher.is_terminated()
    matcher.accept(tok.eos_token_ids[0])
    assert matcher.is_terminated()


def test_rejected_token_raises(cache, tok):
    matcher = cache.matcher(GrammarSpec.json_object())
    with pytest.raises(StructuredOutputError, match="not allowed"):
        matcher.accept(tok.encode("x", add_bos=False)[0])  # a JSON object cannot start with x
    with pytest.raises(StructuredOutputError, match="not allowed"):
        # json_object means an object (OpenAI JSON mode), not any JSON value: an array is refused
        cache.matcher(GrammarSpec.json_object()).accept(tok.token_to_id("["))


# ---- random sampling under constraints ------------------------------------------------------------------
def test_fifty_random_samples_validate_against_the_schema(cache, tok):
    gen = torch.Generator().manual_seed(0)
    spec = GrammarSpec.json_schema(PERSON_SCHEMA)
    for i in range(50):
        ids, terminated = sample_constrained(cache, spec, gen)
        text = tok.decode(ids)
        assert terminated, f"sample {i} did not finish: {text!r}"
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)  # strict json.loads: no raw control characters


def test_random_samples_match_the_regex(cache, tok):
    gen = torch.Generator().manual_seed(1)
    pattern = r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)"
    for _ in range(20):
        ids, terminated = sample_constrained(cache, GrammarSpec.regex(pattern), gen)
        assert terminated and re.fullmatch(pattern, tok.decode(ids)), tok.decode(ids)


def test_random_samples_follow_the_ebnf_grammar(cache, tok):
    gen = torch.Generator().manual_seed(2)
    spec = GrammarSpec.grammar('root ::= "answer: " ("yes" | "no") "."')
    seen = set()
    for _ in range(20):
        ids, terminated = sample_constrained(cache, spec, gen)
        assert terminated
        seen.add(tok.decode(ids))
    assert seen <= {"answer: yes.", "answer: no."} and seen


# ---- specs and the cache --------------------------------------------------------------------------------
def test_equal_schemas_share_one_compiled_grammar(cache):
    a = GrammarSpec.json_schema({"type": "object", "properties": {"p": {"type": "integer"}}})
    b = GrammarSpec.json_schema('{"properties": {"p": {"type": "integer"}}, "type": "object"}')
    assert a == b
    misses = cache.misses
    assert cache.compile(a) is cache.compile(b)
    assert cache.misses == misses + 1


@pytest.mark.parametrize("spec,match", [
    (GrammarSpec.regex("(unclosed"), "regex"),
    (GrammarSpec.grammar("root ::= undefined_rule"), "grammar"),
    (GrammarSpec.json_schema({"type": "no-such-type"}), "json_schema"),
])
def test_bad_specs_raise_a_clear_error(cache, spec, match):
    with pytest.raises(StructuredOutputError, match=f"cannot compile the {match} constraint"):
        cache.compile(spec)


def test_spec_from_request():
    assert GrammarSpec.from_request({"type": "text"}) is None
    assert GrammarSpec.from_request(None) is None
    assert GrammarSpec.from_request({"type": "json_object"}) == GrammarSpec.json_object()
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA, "strict": True}}
    assert GrammarSpec.from_request(rf) == GrammarSpec.json_schema(PERSON_SCHEMA)
    assert GrammarSpec.from_request(regex="a+") == GrammarSpec.regex("a+")
    with pytest.raises(StructuredOutputError, match="at most one"):
        GrammarSpec.from_request({"type": "json_object"}, regex="a+")
    with pytest.raises(StructuredOutputError, match="json_schema needs"):
        GrammarSpec.from_request({"type": "json_schema"})
    with pytest.raises(StructuredOutputError, match="not supported"):
        GrammarSpec.from_request({"type": "yaml"})
    with pytest.raises(StructuredOutputError, match="not valid JSON"):
        GrammarSpec.json_schema("{nope")


def test_bounded_strings_become_patterns():
    schema = {"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 5},
        "b": {"type": "string", "minLength": 2},
        "c": {"type": "string", "pattern": "^x+$", "maxLength": 3},
        "d": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 2}}}}
    out = _bounded_strings_as_patterns(schema)["properties"]
    assert out["a"] == {"type": "string", "pattern": "^[^\\ud800-\\udfff]{0,5}$"}
    assert out["b"] == {"type": "string", "pattern": "^[^\\ud800-\\udfff]{2,}$"}
    assert out["c"] == schema["properties"]["c"]  # an explicit pattern is left alone
    assert out["d"]["items"] == {"type": "string", "pattern": "^[^\\ud800-\\udfff]{1,2}$"}


def test_bounded_strings_admit_no_encoded_surrogates(cache, tok):
    """Byte-level tokens can spell UTF-8-encoded surrogates (ED A0..BF ..), which are no characters: after
    the lead byte ED a length-bounded string must not allow a continuation byte of that range."""
    m = cache.matcher(GrammarSpec.json_schema({"type": "string", "minLength": 1, "maxLength": 8}))
    m.accept(tok.token_to_id('"'))
    m.accept(tok.token_to_id("í"))                       # byte ED
    mask = allocate_bitmask(1, MODEL_VOCAB)
    m.fill_bitmask(mask)
    allowed = {t for t in range(MODEL_VOCAB) if (int(mask[0, t // 32]) >> (t % 32)) & 1}
    assert tok.token_to_id("µ") not in allowed                # B5: would start a surrogate
    assert tok.token_to_id("Ģ") in allowed                    # 80..9F stay allowed (U+D000..U+D7FF)
