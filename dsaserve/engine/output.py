"""From engine token deltas to what a user sees: the one implementation behind ``LLM`` and the server.

``OutputProcessor`` keeps, per sequence of a request (``n`` of them), an incremental detokenizer
(``engine.detokenizer``) and turns each ``StepOutput`` of ``engine.step()`` into a ``RequestOutput``: the
new final text, the new token ids and logprobs, whether the sequence (and the whole request) finished and
why. A stop string ends a sequence early: its text is cut before the string, the engine is told to abort
that sequence, and the finish reason is "stop". Requests aborted by the caller are forgotten (and aborted
in the engine); a late output for them is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dsaserve.engine.detokenizer import IncrementalDetokenizer
from dsaserve.engine.types import FinishReason, SamplingParams, StepOutput


class _NoTokenizer:
    """For checkpoints without a tokenizer: requests carry token ids and outputs have no text."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


@dataclass
class RequestOutput:
    """One sequence's progress in one engine step (a streaming delta)."""

    request_id: str
    text: str                                   # new text that is final (stop strings held back / cut)
    token_ids: list[int]                        # new token ids (all of them, also past a stop string)
    logprobs: list[dict[int, float]] | None     # their top-k logprobs, when asked for
    finished: bool                              # this sequence is done
    finish_reason: str | None                   # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int
    num_generated_tokens: int                   # so far, this delta included
    index: int = 0                              # which of the request's n sequences
    request_finished: bool = False              # every sequence of the request is done
    prompt_logprobs: list[dict[int, float] | None] | None = None   # once (sequence 0), when asked for


class _Sequence:
    def __init__(self, detok: IncrementalDetokenizer):
        self.detok = detok
        self.num_generated = 0
        self.finished = False


class _Tracked:
    def __init__(self, sequences: list[_Sequence], num_prompt_tokens: int):
        self.sequences = sequences
        self.num_prompt_tokens = num_prompt_tokens
        self.unfinished = len(sequences)


class OutputProcessor:
    """Detokenization, stop strings, aborts and finish reasons for the requests of one engine.

    ``tokenizer`` needs ``decode(ids, skip_special_tokens=...)`` (None: no text). ``abort_in_engine`` is the
    engine's ``abort_request(request_id, index=None)``: called when a stop string ends a sequence the engine
    is still running (with its index when the request has several), or for the whole request.
    """

    def __init__(self, tokenizer, abort_in_engine: Callable[..., None]):
        self.tokenizer = tokenizer if tokenizer is not None else _NoTokenizer()
        self.abort_in_engine = abort_in_engine
        self._requests: dict[str, _Tracked] = {}

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Track a request the engine accepted (its ``params.n`` sequences)."""
        seqs = [_Sequence(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                                 min_tokens=params.min_tokens)) for _ in range(params.n)]
        self._requests[request_id] = _Tracked(seqs, len(prompt_token_ids))

    def abort(self, request_id: str) -> bool:
        """Stop a request (client gone, caller error): abort it in the engine and forget it. Returns whether it
        was still running."""
        if self._requests.pop(request_id, None) is None:
            return False
        self.abort_in_engine(request_id)
        return True

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def process(self, outputs: list[StepOutput]) -> list[RequestOutput]:
        """One ``RequestOutput`` per output of a sequence still tracked, in order."""
        results = []
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is None or not 0 <= out.index < len(req.sequences):
                continue                                   # aborted (or finished by a stop string) meanwhile
            seq = req.sequences[out.index]
            if seq.finished:
                continue
            seq.num_generated += len(out.new_token_ids)
            det = seq.detok.step(out.new_token_ids, finished=out.finished)
            finished, reason = out.finished, out.finish_reason
            if det.stopped:
                if not finished:                           # the engine would generate more: stop it
                    if len(req.sequences) == 1:
                        self.abort_in_engine(out.request_id)
                    else:
                        self.abort_in_engine(out.request_id, out.index)
                finished, reason = True, FinishReason.STOP.value
            if finished:
                seq.finished = True
                req.unfinished -= 1
                if req.unfinished == 0:
                    del self._requests[out.request_id]
            results.append(RequestOutput(out.request_id, det.text, list(out.new_token_ids), out.new_logprobs,
                                         finished, reason, req.num_prompt_tokens, seq.num_generated,
                                         index=out.index, request_finished=finished and req.unfinished == 0,
                                         prompt_logprobs=out.prompt_logprobs))
        return results
