"""The offline API: ``LLM(model_dir, pp_size, cp_size, device, dtype).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import sys

from tqdm import tqdm

from dsaserve.engine.engine import LLMEngine
from dsaserve.engine.output import OutputProcessor
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
        self.outputs = OutputProcessor(self.tokenizer, self.engine.abort_request)
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[CompletionOutput]:
        """One ``CompletionOutput`` per sequence: for each prompt in order, its ``n`` sequences by ``index``."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        token_lists = [self._tokenize(p) for p in prompts]
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        n_of = {rid: sp.n for rid, sp in zip(ids, params_list)}
        results = {(rid, i): CompletionOutput(toks, [], "", [] if sp.logprobs is not None else None, index=i)
                   for rid, toks, sp in zip(ids, token_lists, params_list) for i in range(sp.n)}
        try:
            for rid, toks, sp in zip(ids, token_lists, params_list):
                self.engine.add_request(rid, toks, sp)
                self.outputs.add(rid, toks, sp)
        except Exception:
            for rid in ids:                              # none of the batch runs
                self.outputs.abort(rid)
                self.engine.abort_request(rid)
            raise
        show = sys.stderr.isatty() if use_tqdm is None else use_tqdm
        with tqdm(total=len(results), desc="generate", disable=not show) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.outputs.process(self.engine.step()):
                    res = results[(out.request_id, out.index)]
                    res.token_ids += out.token_ids
                    res.text += out.text
                    if out.logprobs is not None and res.logprobs is not None:
                        res.logprobs += out.logprobs
                    if out.prompt_logprobs is not None:           # the prompt's, shared by its n sequences
                        for i in range(n_of[out.request_id]):
                            results[(out.request_id, i)].prompt_logprobs = out.prompt_logprobs
                    if out.finished:
                        res.finish_reason = out.finish_reason
                        bar.update(1)
        return [results[(rid, i)] for rid, sp in zip(ids, params_list) for i in range(sp.n)]

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def stats(self) -> dict:
        """Per rank: communication counters, prefill indexer launches and how many ran on a reserved SM
        budget (``indexer_sm_budget``), and phase timings when profiling."""
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
