"""IncrementalDetokenizer: streaming decode equals full decode, no partial UTF-8, stop strings."""

from __future__ import annotations

import random

import pytest

from dsaserve.engine.detokenizer import IncrementalDetokenizer

from tests.server.fake_engine import EOS, STORY, STORY_IDS, FakeTokenizer

TOK = FakeTokenizer()


def run_stream(tok, ids, stop=(), chunks=None, prompt=()):
    """Feed ids in chunks; return (deltas, detokenizer)."""
    det = IncrementalDetokenizer(tok, prompt, stop)
    deltas, pos = [], 0
    sizes = chunks or [1] * len(ids)
    for i, n in enumerate(sizes):
        piece = ids[pos:pos + n]
        pos += n
        out = det.step(piece, finished=pos >= len(ids))
        deltas.append(out.text)
        if out.stopped:
            break
    return deltas, det


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_equals_full_decode_without_partial_chars(seed):
    rng = random.Random(seed)
    ids = STORY_IDS * 2
    sizes, left = [], len(ids)
    while left:
        sizes.append(min(left, rng.randint(1, 3)))
        left -= sizes[-1]
    deltas, det = run_stream(TOK, ids, chunks=sizes, prompt=TOK.encode("Hi"))
    assert "".join(deltas) == TOK.decode(ids) == STORY * 2
    assert all("\ufffd" not in d for d in deltas), "a partial UTF-8 character was emitted"
    # Multi-byte characters really were split across tokens in this test.
    assert any(len(TOK.decode([t])) == 1 and TOK.decode([t]) == "\ufffd" for t in ids)


def test_special_tokens_skipped_and_invalid_bytes_flushed_at_finish():
    det = IncrementalDetokenizer(TOK, [], [])
    assert det.step([ord("a"), EOS]).text == "a"
    # A lone lead byte of a 3-byte character: held while more could come, emitted at the end.
    assert det.step([0xE2]).text == ""
    assert det.step([], finished=True).text == "\ufffd"


def test_invalid_bytes_released_after_max_pending():
    det = IncrementalDetokenizer(TOK, [], [])
    texts = [det.step([0x80]).text for _ in range(6)]  # lone continuation bytes never complete
    assert "".join(texts).count("\ufffd") >= 4  # not held forever


def test_byte_level_bpe_hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["héllo wörld 你好世界 🦊🦊 naïve café"] * 50 + ["the quick brown fox"] * 50
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

    class Wrap:
        def decode(self, ids, skip_special_tokens=True):
            return tk.decode(ids, skip_special_tokens=skip_special_tokens)

    text = "naïve 你好, 世界! 🦊 café über"
    ids = tk.encode(text).ids
    deltas, _ = run_stream(Wrap(), ids)
    assert "".join(deltas) == tk.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cuts_output_and_spans_tokens():
    text = "Once upon a time Zoë the fox jumped"
    ids = TOK.encode(text, add_bos=False)
    deltas, det = run_stream(TOK, ids, stop=["fox"])
    assert det.stopped and det.stop_string == "fox"
    assert "".join(deltas) == "Once upon a time Zoë the "
    assert det.text == "Once upon a time Zoë the "


def test_stop_string_earliest_wins_and_multibyte_stop():
    ids = TOK.encode("abc ✓ def xyz", add_bos=False)
    deltas, det = run_stream(TOK, ids, stop=["xyz", "✓"])
    assert "".join(deltas) == "abc " and det.stop_string == "✓"


def test_stop_string_at_start_gives_empty_output():
    deltas, det = run_stream(TOK, TOK.encode("STOP here", add_bos=False), stop=["STOP"])
    assert det.stopped and "".join(deltas) == ""


def test_stream_holds_back_possible_stop_prefix():
    # "fo" could start "fox": it must not be emitted until "r" proves otherwise.
    det = IncrementalDetokenizer(TOK, [], ["fox"])
    assert det.step([ord("a")]).text == "a"
    assert det.step([ord(" ")]).text == " "
    assert det.step([ord("f")]).text == ""
    assert det.step([ord("o")]).text == ""
    assert det.step([ord("r")]).text == "for"
    assert det.step([ord("f"), ord("o")]).text == ""
    out = det.step([ord("x"), ord("!")])
    assert out.stopped and out.text == "" and det.text == "a for"
    assert det.step([ord("z")]).text == ""  # nothing after a stop


def test_held_back_text_flushed_when_finished():
    det = IncrementalDetokenizer(TOK, [], ["fox"])
    assert det.step([ord("f")]).text == ""
    out = det.step([ord("o")], finished=True)
    assert out.text == "fo" and not out.stopped


def test_stop_not_matched_in_prompt():
    prompt = TOK.encode("the fox", add_bos=False)
    det = IncrementalDetokenizer(TOK, prompt, ["fox"])
    out = det.step(TOK.encode(" ran", add_bos=False), finished=True)
    assert out.text == " ran" and not out.stopped


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(TOK, [], [""])
