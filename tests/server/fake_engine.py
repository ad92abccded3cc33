"""A fake ``LLMEngine`` for server tests: same interface, deterministic output, no torch.

* ``FakeTokenizer``: byte-level (ids 0..255 are bytes) plus special tokens and a few multi-byte word
  tokens, so multi-byte characters get split across tokens exactly like byte-level BPE does.
* ``FakeEngine``: a small continuous-batching scheduler (token budget per step, chunked prefill, decodes
  batched) whose greedy output for a prompt is a fixed function of the prompt: tokens of ``STORY``
  starting at an offset derived from the prompt. Output is therefore independent of batching, which lets
  tests compare concurrent against sequential runs.
* ``worker_process=True`` computes the tokens in a real child process (spawned, talking over a pipe):
  killing it makes ``step()`` raise ``EngineDeadError``, which exercises the server's fault path.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

import jinja2

from dsaserve.engine.types import EngineDeadError, FinishReason, SamplingParams, StepOutput

BOS, EOS = 256, 257
SPECIAL = {256: "<s>", 257: "</s>", 258: "<|user|>", 259: "<|assistant|>", 260: "<|system|>"}
WORDS = [" the", " fox", "é", " über", "✓", "🦊", " jumped", "Zoë"]  # ids 261..
VOCAB_SIZE = 300
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class FakeTokenizer:
    """Byte-level tokenizer with the interface of ``dsaserve.tokenizer.Tokenizer``."""

    def __init__(self, chat_template: str | None = CHAT_TEMPLATE) -> None:
        self.vocab_size = VOCAB_SIZE
        self.eos_token_ids = [EOS]
        self.bos_token_id = BOS
        self.bos_token = SPECIAL[BOS]
        self.eos_token = SPECIAL[EOS]
        self.chat_template = chat_template
        self._pieces: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for i, s in SPECIAL.items():
            self._pieces[i] = s.encode()
        for j, w in enumerate(WORDS):
            self._pieces[261 + j] = w.encode()
        # Longest-first greedy matching over specials and words.
        self._match = sorted(((p, i) for i, p in self._pieces.items() if i >= 256), key=lambda x: -len(x[0]))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        ids = [BOS] if add_bos else []
        pos = 0
        while pos < len(data):
            for piece, i in self._match:
                if data.startswith(piece, pos):
                    ids.append(i)
                    pos += len(piece)
                    break
            else:
                ids.append(data[pos])
                pos += 1
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = b"".join(
            self._pieces.get(int(i), b"") for i in ids if not (skip_special_tokens and int(i) in SPECIAL)
        )
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return jinja2.Template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token
        )


TOKENIZER = FakeTokenizer()
STORY = "Once upon a time Zoë the fox jumped über the café ✓ and met a naïve 🦊 friend; 你好 they ran far. "
STORY_IDS = TOKENIZER.encode(STORY, add_bos=False)


def story_offset(prompt_token_ids: list[int]) -> int:
    return (sum(prompt_token_ids) * 7 + len(prompt_token_ids)) % len(STORY_IDS)


def next_token(prompt_token_ids: list[int], k: int, seed: int | None, temperature: float, index: int = 0) -> int:
    """The k-th generated token (0-based) of sequence ``index`` for a prompt: a pure function, so batching
    cannot change it."""
    if b"EOS" in bytes(t for t in prompt_token_ids if t < 256) and k == 3:
        return EOS
    if temperature > 0:
        rng = random.Random(f"{seed}-{index}-{k}-{sum(prompt_token_ids)}")
        return STORY_IDS[rng.randrange(len(STORY_IDS))]
    return STORY_IDS[(story_offset(prompt_token_ids) + k) % len(STORY_IDS)]


def expected_greedy_ids(prompt_token_ids: list[int], n: int) -> list[int]:
    return [next_token(prompt_token_ids, k, None, 0.0) for k in range(n)]


def _worker_main(conn) -> None:
    """Child process: computes next tokens for the jobs the engine sends."""
    while True:
        try:
            jobs = conn.recv()
        except EOFError:
            return
        if jobs is None:
            return
        conn.send([next_token(*job) for job in jobs])


@dataclass
class _Req:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    prefilled: int = 0
    generated: list[list[int]] = field(default_factory=list)   # per sequence
    done: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.generated = [[] for _ in range(self.params.n)]
        self.done = [False] * self.params.n


class FakeEngine:
    """Deterministic stand-in for ``dsaserve.engine.engine.LLMEngine`` (see module docstring)."""

    def __init__(
        self,
        model_dir: str = "fake-model",
        pp_size: int = 1,
        cp_size: int = 1,
        device: str = "cpu",
        dtype: str = "float32",
        max_model_len: int = 256,
        max_num_batched_tokens: int = 64,
        max_num_seqs: int = 32,
        step_delay: float = 0.002,
        worker_process: bool = False,
        worker_timeout: float = 10.0,
        chat_template: str | None = CHAT_TEMPLATE,
        **options,
    ) -> None:
        self.tokenizer = FakeTokenizer(chat_template)
        self.vocab_size = VOCAB_SIZE
        self.model_name = os.path.basename(os.path.normpath(model_dir))
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.step_delay = step_delay
        self.worker_timeout = worker_timeout
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._all: dict[str, _Req] = {}
        self.aborted: list[str] = []          # for tests: ids aborted through abort_request
        self.added: list[str] = []
        self.steps = 0
        self._dead = False
        self._worker = None
        self._conn = None
        if worker_process:
            ctx = mp.get_context("spawn")
            self._conn, child = ctx.Pipe()
            self._worker = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="fake-worker")
            self._worker.start()
            child.close()

    # --- interface -------------------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        return [self._worker.pid] if self._worker is not None and self._worker.pid else []

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._all:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; max_model_len is {self.max_model_len}")
        req = _Req(request_id, list(prompt_token_ids), params)
        self._all[request_id] = req
        self._waiting.append(req)
        self.added.append(request_id)

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        req = self._all.get(request_id)
        if req is None:
            return
        if index is not None:
            req.done[index] = True
            if not all(req.done):
                return
        del self._all[request_id]
        self.aborted.append(request_id)
        if req in self._waiting:
            self._waiting.remove(req)
        if req in self._running:
            self._running.remove(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self._all)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def is_healthy(self) -> bool:
        if self._dead:
            return False
        if self._worker is not None and not self._worker.is_alive():
            return False
        return True

    def liveness_problem(self, step_timeout_s: float | None = None) -> str | None:
        return None

    def step(self) -> list[StepOutput]:
        if self._dead:
            raise EngineDeadError("engine is dead")
        self.steps += 1
        budget = self.max_num_batched_tokens
        # Decodes first (one token each), then prefill chunks of waiting requests under the budget.
        sample: list[_Req] = [r for r in self._running if r.prefilled == len(r.prompt)][:budget]
        budget -= len(sample)
        while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
            req = self._waiting[0]
            chunk = min(budget, len(req.prompt) - req.prefilled)
            req.prefilled += chunk
            budget -= chunk
            if req.prefilled == len(req.prompt):
                self._waiting.popleft()
                self._running.append(req)
                sample.append(req)
            else:
                break  # the rest of this prompt goes in the next step (chunked prefill)
        if self.step_delay:
            time.sleep(self.step_delay)
        seqs = [(r, i) for r in sample for i in range(r.params.n) if not r.done[i]]
        jobs = [(r.prompt, len(r.generated[i]), r.params.seed, r.params.temperature, i) for r, i in seqs
                if r.params.max_tokens > 0]
        tokens = self._compute(jobs) if jobs else []
        outputs = []
        if any(r.params.max_tokens == 0 for r, _ in seqs):        # prompt only: scored, nothing generated
            for r, i in [(r, i) for r, i in seqs if r.params.max_tokens == 0]:
                r.done[i] = True
                outputs.append(StepOutput(r.request_id, [], None, True, FinishReason.LENGTH.value,
                                          num_prompt_tokens=len(r.prompt), index=i,
                                          prompt_logprobs=self._prompt_logprobs(r) if i == 0 else None))
            seqs = [(r, i) for r, i in seqs if r.params.max_tokens > 0]
        for (req, i), tok in zip(seqs, tokens):
            first = not req.generated[i]
            req.generated[i].append(tok)
            p = req.params
            reason = None
            if tok in self.tokenizer.eos_token_ids and not p.ignore_eos or tok in p.stop_token_ids:
                reason = FinishReason.STOP.value
            elif len(req.generated[i]) >= p.max_tokens or len(req.prompt) + len(req.generated[i]) >= self.max_model_len:
                reason = FinishReason.LENGTH.value
            logprobs = None
            if p.logprobs is not None:
                top = {tok: -0.25}
                for j in range(p.logprobs):
                    top.setdefault((tok + 1 + j) % 256, -1.0 - j)
                logprobs = [top]
            outputs.append(StepOutput(req.request_id, [tok], logprobs, reason is not None, reason,
                                      num_prompt_tokens=len(req.prompt), index=i,
                                      prompt_logprobs=self._prompt_logprobs(req) if first and i == 0 else None))
            if reason is not None:
                req.done[i] = True
        for req in sample:
            if all(req.done) and req.request_id in self._all:
                self._running.remove(req)
                del self._all[req.request_id]
        return outputs

    @staticmethod
    def _prompt_logprobs(req: _Req) -> list | None:
        """Fake prompt logprobs: -0.5 for each prompt token after the first (and the top-n of the fake)."""
        n = req.params.prompt_logprobs
        if n is None:
            return None
        out: list = [None]
        for t in req.prompt[1:]:
            lp = {t: -0.5}
            for j in range(n):
                lp.setdefault((t + 1 + j) % 256, -1.5 - j)
            out.append(lp)
        return out

    def _compute(self, jobs: list) -> list[int]:
        if self._worker is None:
            return [next_token(*job) for job in jobs]
        try:
            self._conn.send(jobs)
            deadline = time.monotonic() + self.worker_timeout
            while not self._conn.poll(0.05):
                if not self._worker.is_alive() or time.monotonic() > deadline:
                    raise EngineDeadError(f"worker process {self._worker.pid} died or stopped answering")
            return self._conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            self._dead = True
            raise EngineDeadError(f"worker process {self._worker.pid} is gone: {e!r}") from e
        except EngineDeadError:
            self._dead = True
            raise

    def shutdown(self) -> None:
        self._dead = True
        if self._worker is not None:
            try:
                self._conn.send(None)
            except Exception:
                pass
            self._worker.join(timeout=2)
            if self._worker.is_alive():
                self._worker.kill()
                self._worker.join(timeout=5)
            self._worker = None


def make_fake_engine(model_dir: str = "fake-model", **kwargs) -> FakeEngine:
    """Engine factory for ``dsaserve serve --engine-factory tests.server.fake_engine:make_fake_engine``.

    Environment knobs (the CLI passes only standard flags): FAKE_ENGINE_WORKER=1 spawns a worker process,
    FAKE_ENGINE_STEP_DELAY sets the per-step sleep in seconds, FAKE_ENGINE_START_DELAY makes start-up take
    that long (a model loading), FAKE_ENGINE_MARKER names a file created when the engine is built.
    """
    if os.environ.get("FAKE_ENGINE_MARKER"):
        with open(os.environ["FAKE_ENGINE_MARKER"], "w") as f:
            f.write(str(os.getpid()))
    time.sleep(float(os.environ.get("FAKE_ENGINE_START_DELAY", "0")))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # EngineArgs' "use the default" Nones
    kwargs.setdefault("worker_process", os.environ.get("FAKE_ENGINE_WORKER") == "1")
    if "FAKE_ENGINE_STEP_DELAY" in os.environ:
        kwargs.setdefault("step_delay", float(os.environ["FAKE_ENGINE_STEP_DELAY"]))
    return FakeEngine(model_dir, **kwargs)
