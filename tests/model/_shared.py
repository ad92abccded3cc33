"""Session-wide tiny checkpoints, LLMs and transformers references shared by tests/model and tests/engine.

Everything here is built once per test session (module-level caches keyed by what was asked) so the two
test folders' conftests hand out the same objects: one checkpoint per (arch, fp8), one ``LLM`` per set of
options, one transformers model per arch, one transformers greedy run per (arch, prompt).
"""

from __future__ import annotations

import json
import os

import torch

ARCHS = ("deepseek_v32", "glm_moe_dsa")
# Prompt lengths below and well above the tiny config's index_topk = 32.
PROMPT_LENS = (5, 31, 33, 90, 300)
MAX_TOKENS = 16
TOPK_LOGPROBS = 5
# Every LLM of the suite: a small cache (the CPU default would reserve 4 x 16K tokens per engine).
LLM_DEFAULTS = dict(kv_cache_tokens=8192, max_model_len=4096, indexer_mode="exact")


def prompt_ids(length: int, seed: int = 1) -> list[int]:
    """A deterministic random prompt of real (non-special, tokenizer-covered) ids 5..479."""
    gen = torch.Generator().manual_seed(seed * 100_003 + length)
    return torch.randint(5, 480, (length,), generator=gen).tolist()


class TinyWorld:
    """Caches of everything expensive. One instance per session (see ``get_world``)."""

    def __init__(self, base_dir: str):
        self.base = base_dir
        self._dirs: dict = {}
        self._llms: dict = {}
        self._hf: dict = {}
        self._hf_runs: dict = {}

    # ---- checkpoints ---------------------------------------------------------------------------------
    def ckpt(self, arch: str, fp8: bool = False, seed: int = 0) -> str:
        key = (arch, fp8, seed)
        if key not in self._dirs:
            from dsaserve.checkpoint.tiny import make_tiny_checkpoint

            path = os.path.join(self.base, f"tiny-{arch}{'-fp8' if fp8 else ''}-s{seed}")
            self._dirs[key] = make_tiny_checkpoint(path, arch=arch, fp8=fp8, seed=seed)
        return self._dirs[key]

    def variant(self, arch: str, name: str, config_changes: dict, gen_changes: dict | None = None) -> str:
        """A copy of the bf16 tiny checkpoint with config.json (and generation_config.json) fields changed;
        the weight files are symlinked."""
        key = ("variant", arch, name)
        if key in self._dirs:
            return self._dirs[key]
        src = self.ckpt(arch)
        dst = os.path.join(self.base, f"tiny-{arch}-{name}")
        os.makedirs(dst)
        for f in os.listdir(src):
            if f in ("config.json", "generation_config.json"):
                with open(os.path.join(src, f)) as fh:
                    data = json.load(fh)
                data.update(config_changes if f == "config.json" else (gen_changes or {}))
                with open(os.path.join(dst, f), "w") as fh:
                    json.dump(data, fh, indent=2)
            else:
                os.symlink(os.path.join(src, f), os.path.join(dst, f))
        self._dirs[key] = dst
        return dst

    # ---- engines -------------------------------------------------------------------------------------
    def llm(self, model_dir: str, **options):
        """A cached ``LLM`` on ``model_dir`` with LLM_DEFAULTS overridden by ``options``."""
        opts = {**LLM_DEFAULTS, **options}
        key = (model_dir, tuple(sorted(opts.items())))
        if key not in self._llms:
            from dsaserve import LLM

            self._llms[key] = LLM(model_dir, **opts)
        return self._llms[key]

    def arch_llm(self, arch: str, **options):
        return self.llm(self.ckpt(arch), **options)

    # ---- transformers oracle -------------------------------------------------------------------------
    def hf_model(self, arch: str):
        if arch not in self._hf:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.ckpt(arch), dtype=torch.float32)
            self._hf[arch] = model.eval()
        return self._hf[arch]

    def hf_greedy(self, arch: str, prompt: list[int], max_new_tokens: int = MAX_TOKENS):
        """transformers' greedy continuation -> (token ids, [steps, vocab] fp32 log-probabilities)."""
        key = (arch, tuple(prompt), max_new_tokens)
        if key not in self._hf_runs:
            model = self.hf_model(arch)
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                                     eos_token_id=None, pad_token_id=0, output_logits=True,
                                     return_dict_in_generate=True)
            tokens = out.sequences[0, len(prompt):].tolist()
            logprobs = torch.stack([lg[0].float() for lg in out.logits]).log_softmax(-1)
            self._hf_runs[key] = (tokens, logprobs)
        return self._hf_runs[key]

    def base_output(self, arch: str, length: int):
        """Greedy 16 tokens (+ top-5 logprobs, EOS ignored) of ``prompt_ids(length)`` alone on the default
        exact LLM of ``arch`` (one-shot prefill): the reference the engine tests compare against."""
        key = ("base", arch, length)
        if key not in self._hf_runs:
            from dsaserve import SamplingParams

            params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOPK_LOGPROBS)
            self._hf_runs[key] = self.arch_llm(arch).generate([prompt_ids(length)], params)[0]
        return self._hf_runs[key]

    def shutdown(self) -> None:
        for llm in self._llms.values():
            llm.shutdown()
        self._llms.clear()


_WORLD: TinyWorld | None = None


def get_world(tmp_path_factory) -> TinyWorld:
    global _WORLD
    if _WORLD is None:
        _WORLD = TinyWorld(str(tmp_path_factory.mktemp("tiny_world")))
    return _WORLD


def shutdown_world() -> None:
    global _WORLD
    if _WORLD is not None:
        _WORLD.shutdown()
        _WORLD = None


def max_logprob_diff(ours: list[dict[int, float]], ref: torch.Tensor) -> float:
    """Largest |ours - ref| over every (token, logprob) entry; ref [steps, vocab] log-probabilities."""
    worst = 0.0
    for step, lp in enumerate(ours):
        for tok, val in lp.items():
            worst = max(worst, abs(val - float(ref[step, tok])))
    return worst


def max_dict_diff(a: list[dict[int, float]], b: list[dict[int, float]]) -> float:
    """Largest difference between two logprob lists that must hold the same keys at every step."""
    assert len(a) == len(b)
    worst = 0.0
    for da, db in zip(a, b):
        assert set(da) == set(db), f"different top-k token sets: {sorted(da)} vs {sorted(db)}"
        worst = max(worst, max(abs(da[k] - db[k]) for k in da))
    return worst
