"""dsaserve.tokenizer on the tiny checkpoint's tokenizer."""

import json
import os

import pytest

from dsaserve.checkpoint.tiny import ASSISTANT, BOS, EOS, TOKENIZER_VOCAB, USER, build_tiny_tokenizer
from dsaserve.tokenizer import Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def tok(tiny_ds):
    t = Tokenizer.from_dir(tiny_ds)
    assert t is not None
    return t


def test_ids_and_sizes(tok):
    assert tok.bos_token_id == 0 and tok.eos_token_ids == [1]
    assert tok.token_to_id(USER) == 2 and tok.token_to_id(ASSISTANT) == 3
    assert tok.vocab_size == TOKENIZER_VOCAB <= 512


@pytest.mark.parametrize("text", ["The quick brown fox jumps over the lazy dog.", "unseen wörds ☃ and 12345!\n\ttabs",
                                  "", "  leading spaces"])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_bpe_merges_common_words(tok):
    # trained merges: a sentence from the training text takes far fewer tokens than bytes
    text = "The capital of France is Paris."
    assert len(tok.encode(text, add_bos=False)) < len(text.encode()) / 2.5


def test_special_tokens_in_text(tok):
    ids = tok.encode(f"{BOS}{USER}hi{ASSISTANT}", add_bos=True)
    assert ids[:2] == [0, 2] and ids[-1] == 3 and ids.count(0) == 1  # no double bos
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == f"{BOS}{USER}hi{ASSISTANT}"


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(msgs)
    assert text == f"{BOS}Be brief.{USER}Hi{ASSISTANT}Hello{EOS}{USER}Bye{ASSISTANT}"
    assert tok.apply_chat_template(msgs[:2], add_generation_prompt=False) == f"{BOS}Be brief.{USER}Hi"
    ids = tok.encode(text, add_bos=False)
    assert ids[0] == 0 and ids[-1] == 3 and 1 in ids
    with pytest.raises(TokenizerError, match="unsupported chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_matches_transformers(tiny_ds):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_ds)
    ours = Tokenizer.from_dir(tiny_ds)
    msgs = [{"role": "user", "content": "What is two plus two?"}]
    text = ours.apply_chat_template(msgs)
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    assert hf(text, add_special_tokens=False).input_ids == ours.encode(text, add_bos=False)
    assert hf("plain text").input_ids == ours.encode("plain text")


def test_sandboxed(tmp_path, tiny_ds):
    for f in ("tokenizer.json",):
        (tmp_path / f).write_bytes(open(os.path.join(tiny_ds, f), "rb").read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": {"content": EOS}, "chat_template": "{{ ''.__class__.__mro__ }}"}))
    t = Tokenizer.from_dir(str(tmp_path))
    assert t.eos_token_ids == [1]
    with pytest.raises(TokenizerError, match="chat template failed"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_files(tmp_path, tiny_ds):
    assert Tokenizer.from_dir(str(tmp_path)) is None  # e.g. a transformers save_pretrained folder
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(tiny_ds, "tokenizer.json"), "rb").read())
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 3]}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    t = Tokenizer.from_dir(str(tmp_path))
    assert t.bos_token_id == 0 and t.eos_token_ids == [1, 3]
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == f"{BOS}x"
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(str(tmp_path)).apply_chat_template([])
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path))


def test_training_is_deterministic():
    assert build_tiny_tokenizer().to_str() == build_tiny_tokenizer().to_str()
