"""The offline API: ``LLM(model_dir, pp_size, cp_size, device, dtype).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import sys

from tqdm import tqdm

from dsaserve.engine.detokenizer import IncrementalDetokenizer
from dsaserve.engine.engine import LLMEngine
from dsaserve.engine.types import CompletionOutput, SamplingParams


class LLM:
    """Generate completions for a batch of prompts (strings or token-id lists) with a DSA checkpoint.

    ``pp_size`` x ``cp_size`` processes run the model (workers are spawned locally when > 1). Extra keyword
    options are ``EngineArgs`` fields (``chunked_prefill_size``, ``cp_split``, ``indexer_mode`` ...).
    Call ``shutdown()`` (or use ``with LLM(...) as llm:``) to stop the workers.
    """

    def __init__(self, model_dir: str, pp_size: int = 1, cp_size: int = 1, device: str = "cpu",
                 dtype: str = "float32", **options):
        self.engine = LLMEngine(model_dir, pp_size=pp_size, cp_size=cp_size, device=device, dtype=dtype, **options)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        token_lists = [self._tokenize(p) for p in prompts]
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        results = {rid: CompletionOutput(toks, [], "", [] if sp.logprobs is not None else None)
                   for rid, toks, sp in zip(ids, token_lists, params_list)}
        try:
            for rid, toks, sp in zip(ids, token_lists, params_list):
                self.engine.add_request(rid, toks, sp)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        # stop strings need text: an incremental detokenizer per request that has any
        detok = {rid: IncrementalDetokenizer(self.tokenizer, toks, sp.stop)
                 for rid, toks, sp in zip(ids, token_lists, params_list) if sp.stop and self.tokenizer is not None}
        show = sys.stderr.isatty() if use_tqdm is None else use_tqdm
        with tqdm(total=len(prompts), desc="generate", disable=not show) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    res = results[out.request_id]
                    if res.finish_reason is not None:
                        continue
                    res.token_ids += out.new_token_ids
                    if out.new_logprobs is not None and res.logprobs is not None:
                        res.logprobs += out.new_logprobs
                    finish = out.finish_reason if out.finished else None
                    d = detok.get(out.request_id)
                    if d is not None and d.step(out.new_token_ids, finished=out.finished).stopped and not out.finished:
                        self.engine.abort_request(out.request_id)
                        finish = "stop"
                    if finish is not None:
                        res.finish_reason = finish
                        bar.update(1)
        outputs = [results[rid] for rid in ids]
        if self.tokenizer is not None:
            for rid, out in zip(ids, outputs):
                out.text = detok[rid].text if rid in detok else self.tokenizer.decode(out.token_ids)
        return outputs

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def stats(self) -> dict:
        """Per-rank communication counters and timings (empty on a single process)."""
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
