"""OutputProcessor (the detokenize / stop string / abort / finish reason step that LLM and the server share) and
the EngineClient interface the server is written against."""

from __future__ import annotations

from dsaserve.engine.client import EngineClient
from dsaserve.engine.output import OutputProcessor
from dsaserve.engine.types import SamplingParams, StepOutput
from tests.server.fake_engine import FakeEngine, FakeTokenizer


def _ids(text: str) -> list[int]:
    return list(text.encode())                    # FakeTokenizer: ids 0..255 are bytes


def _out(rid: str, text: str, finished: bool = False, reason: str | None = None) -> StepOutput:
    return StepOutput(rid, _ids(text), None, finished=finished, finish_reason=reason, num_prompt_tokens=2)


def _processor():
    aborted: list[str] = []
    return OutputProcessor(FakeTokenizer(), aborted.append), aborted


def test_a_stop_string_across_deltas_cuts_the_text_and_aborts_the_request_once():
    proc, aborted = _processor()
    proc.add("r", _ids("hi"), SamplingParams(stop=["STOP"]))
    first = proc.process([_out("r", "hello ST")])[0]
    assert (first.text, first.finished) == ("hello ", False)       # "ST" held back: may start the stop string
    second = proc.process([_out("r", "OP and more")])[0]
    assert (second.text, second.finished, second.finish_reason) == ("", True, "stop")
    assert second.token_ids == _ids("OP and more") and second.num_generated_tokens == len("hello STOP and more")
    assert aborted == ["r"] and "r" not in proc
    assert proc.process([_out("r", "late")]) == []                # in flight when it stopped: dropped


def test_a_stop_string_on_the_last_token_is_reported_as_stop_without_an_abort():
    proc, aborted = _processor()
    proc.add("r", [], SamplingParams(stop=["end"]))
    out = proc.process([_out("r", "the end", finished=True, reason="length")])[0]
    assert (out.text, out.finished, out.finish_reason) == ("the ", True, "stop") and aborted == []


def test_without_stop_strings_text_and_reason_pass_through_and_flush_at_the_end():
    proc, aborted = _processor()
    proc.add("a", _ids("x"), SamplingParams())
    proc.add("b", _ids("y"), SamplingParams())
    outs = proc.process([_out("a", "caf"), _out("b", "ok", finished=True, reason="length")])
    assert [(o.request_id, o.text, o.finished, o.finish_reason) for o in outs] == \
        [("a", "caf", False, None), ("b", "ok", True, "length")]
    euro = "€".encode()                                            # 3 bytes: text waits for the last one
    outs = proc.process([StepOutput("a", list(euro[:2]), None, False), StepOutput("a", [euro[2]], None, True, "stop")])
    assert [o.text for o in outs] == ["", "€"] and outs[1].finish_reason == "stop" and aborted == []


def test_abort_forgets_the_request_and_stops_it_in_the_engine():
    proc, aborted = _processor()
    proc.add("r", [], SamplingParams())
    assert proc.abort("r") and aborted == ["r"]
    assert not proc.abort("r") and aborted == ["r"]               # twice: nothing more to do
    assert proc.process([_out("r", "x")]) == []


def test_no_tokenizer_means_no_text_but_the_tokens():
    proc = OutputProcessor(None, lambda rid: None)
    proc.add("r", [1, 2], SamplingParams(stop=["never"]))
    out = proc.process([StepOutput("r", [5, 6], [{5: -0.1}, {6: -0.2}], True, "length")])[0]
    assert (out.text, out.token_ids, out.logprobs, out.finish_reason) == ("", [5, 6], [{5: -0.1}, {6: -0.2}], "length")


def test_the_server_engine_and_the_fake_are_engine_clients(world):
    assert isinstance(world.arch_llm("deepseek_v32").engine, EngineClient)
    assert isinstance(FakeEngine(), EngineClient)
