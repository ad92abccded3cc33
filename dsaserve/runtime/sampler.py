"""Turning a step's logits into tokens, all rows at once: greedy, temperature, top-k, top-p, seeded, logprobs.

One vectorized pass over the rows [m, V] (fp32), row i following ``specs[i]``:

    logits processors (per request, ``LOGITS_PROCESSORS``)  ->  greedy rows: argmax
    other rows: / temperature -> top-k (values below the k-th largest -> -inf) -> softmax
                -> top-p (keep the smallest prefix of the sorted probabilities whose mass reaches top_p,
                   always at least the best token) -> argmax(probs / q), q ~ Exp(1)

The last step is the exponential trick ``torch.multinomial`` itself uses to draw one sample. On CPU, q of a
row is drawn from a ``torch.Generator`` seeded with (seed, output index) exactly as the per-request sampler
before this one drew it, so CPU samples are unchanged (tests/runtime/test_sampler.py keeps that sampler
as the oracle). On CUDA, q comes from a counter-based hash of (seed, output index, vocab id) computed on the
device: stateless like the CPU draw (the sampling rank may change between steps, scheduling does not
change results), with no generator objects and no host sync, but a different stream of numbers, so a
seeded request is reproducible per device type.

Logprobs are those of the raw logits (before processors and temperature): the top n plus the sampled token.

``sample_tensors`` issues no host sync; ``to_host`` brings the step's results back in one copy.

Logits processors (``runtime.logits_processors``: grammar bitmask, logit_bias, min_tokens bans, penalties)
run first, in ``LOGITS_PROCESSORS`` order. Adding one: give ``SampleSpec`` the field it needs (filled by the
scheduler from ``SamplingParams``), write a factory ``(specs, ctx) -> LogitsProcessor | None`` (None when no
row of the step uses it; ``ctx`` is a ``ProcessorContext``: device, the per-row ``SamplingTensors``, the
rank's ``TokenCounts``) and append it. The processor receives the step's [m, V] fp32 logits (row i =
``specs[i]``) before greedy / temperature and returns them changed (it may change them in place); it must
build its tensors once per step from the specs and must not read device values on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from dsaserve.runtime.logits_processors import BUILTIN_PROCESSORS, ProcessorContext, TokenCounts
from dsaserve.runtime.plan import SampledToken, SampleSpec

_SEED_MULT = 1_000_003          # key of a draw: (seed * _SEED_MULT + output index) mod 2^63
_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def noise_key(spec: SampleSpec) -> int:
    """The stateless key of one draw: (request seed, index of the token among the request's outputs)."""
    return (spec.seed * _SEED_MULT + spec.output_index) % (1 << 63)


class LogitsProcessor(Protocol):
    """Changes a step's logits [m, V] fp32 before sampling (see the module docstring)."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        ...


ProcessorFactory = Callable[[list[SampleSpec], ProcessorContext], "LogitsProcessor | None"]
# Applied in order: grammar bitmask, logit_bias, min_tokens bans, penalties (see runtime.logits_processors).
LOGITS_PROCESSORS: list[ProcessorFactory] = list(BUILTIN_PROCESSORS)


@dataclass
class SamplingTensors:
    """The per-row parameters on the logits' device ([m] each). The runner stages them with the rest of a
    decode step's inputs (one host->device copy); ``from_specs`` builds them for any other step."""

    temperature: torch.Tensor      # fp32; 0 = greedy
    top_k: torch.Tensor            # int64; 0 = off
    top_p: torch.Tensor            # fp32; 1.0 = off
    noise_key: torch.Tensor        # int64 (seed, output index) key of the draw
    counts_slot: torch.Tensor      # int64 row of the TokenCounts the penalties read; -1 = no penalties
    presence: torch.Tensor         # fp32 presence penalty
    frequency: torch.Tensor        # fp32 frequency penalty
    repetition: torch.Tensor       # fp32 repetition penalty (1 = off)

    FIELDS = ("temperature", "top_k", "top_p", "noise_key", "counts_slot", "presence", "frequency", "repetition")

    @staticmethod
    def host_values(specs: list[SampleSpec]) -> tuple[list, ...]:
        """One list per field, in the order of ``FIELDS``."""
        return ([float(s.temperature) for s in specs], [s.top_k if s.top_k > 0 else 0 for s in specs],
                [s.top_p for s in specs], [noise_key(s) for s in specs], [s.counts_slot for s in specs],
                [float(s.presence_penalty) for s in specs], [float(s.frequency_penalty) for s in specs],
                [float(s.repetition_penalty) for s in specs])

    @classmethod
    def from_specs(cls, specs: list[SampleSpec], device: torch.device) -> "SamplingTensors":
        dtypes = (torch.float32, torch.int64, torch.float32, torch.int64, torch.int64, torch.float32,
                  torch.float32, torch.float32)
        return cls(*(torch.tensor(v, dtype=dt, device=device) for v, dt in zip(cls.host_values(specs), dtypes)))

    def rows(self, n: int) -> "SamplingTensors":
        """The first n rows (a static decode step's requests, without its padding rows)."""
        return SamplingTensors(*(getattr(self, f)[:n] for f in self.FIELDS))


@dataclass
class SampleOutput:
    """Device results of one step: tokens [m] int64; with logprobs, the sampled token's logprob [m] and, for
    every n asked in the step, the top-n (logprobs, ids) [m, n] of every row (top-n is computed per n, so
    ties resolve exactly as ``topk(n)`` of the row alone)."""

    tokens: torch.Tensor
    vocab: int
    token_logprob: torch.Tensor | None = None
    top: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    # set by ``start_host_copy``: the packed results in pinned host memory, the event that says they are there,
    # and the column of each top-n's ids
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    offsets: dict[int, int] | None = None

    def _packed(self) -> tuple[torch.Tensor, dict[int, int]]:
        """[m, 1 (+ 1 + 2n per top-n)] float64 (exact for token ids): tokens, then logprobs and each top-n's
        (ids, values); and n -> the column of its ids."""
        parts = [self.tokens.double()[:, None]]
        offset: dict[int, int] = {}
        if self.token_logprob is not None:
            parts.append(self.token_logprob.double()[:, None])
            col = 2
            for n, (vals, ids) in (self.top or {}).items():
                offset[n] = col
                parts += [ids.double(), vals.double()]
                col += 2 * n
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), offset

    def start_host_copy(self) -> None:
        """Queue the copy of the results to pinned host memory now (CUDA), so that waiting for them later waits
        for this step only, not for steps queued after it (a ``tolist`` at that point would)."""
        if self.tokens.device.type != "cuda":
            return
        packed, self.offsets = self._packed()
        self.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        self.host.copy_(packed, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()


ARGMAX_GROUPS = 128  # two-stage argmax over rows of at least 64 x this many columns (a multiple of it)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [m, V] -> int64 [m], exactly ``x.argmax(-1)`` (the first maximal column; NaN counts as the maximum).

    Long rows go in two stages, maxima of ARGMAX_GROUPS column groups, then the first best group: torch's
    single-output argmax reduces a row of 129280 logits in one launch that took 28 us at batch 1 (H200);
    ``max(dim)`` returns the first maximal index of each group, so the result is the same index."""
    m, v = x.shape
    g = ARGMAX_GROUPS
    if v % g or v < 64 * g:
        return x.argmax(-1)
    vals, idx = x.reshape(m, g, v // g).max(-1)                                  # [m, g] each
    best = vals.argmax(-1)                                                       # [m] first best group
    return best * (v // g) + idx.gather(1, best[:, None])[:, 0]


def sample_tensors(logits: torch.Tensor, specs: list[SampleSpec], params: SamplingTensors,
                   counts: TokenCounts | None = None) -> SampleOutput:
    """logits [m, V] (row i follows specs[i]) -> the sampled tokens, on the device, without a host sync.
    ``counts``: the rank's token counts (needed when a spec has penalties)."""
    raw = logits.float()
    vocab = raw.shape[1]
    x = raw
    ctx = ProcessorContext(raw.device, params, counts)
    processors = [p for p in (factory(specs, ctx) for factory in LOGITS_PROCESSORS) if p is not None]
    if processors:
        x = raw.clone()
        for proc in processors:
            x = proc(x)
    tokens = argmax_rows(x)                                                      # greedy rows
    if not all(s.temperature == 0.0 for s in specs):
        tokens = torch.where(params.temperature == 0.0, tokens, _draw(x, specs, params))
    out = SampleOutput(tokens, vocab)
    wanted = sorted({min(s.logprobs, vocab) for s in specs if s.logprobs is not None})
    if wanted:
        logp = raw.log_softmax(-1)
        out.token_logprob = logp.gather(1, tokens[:, None])[:, 0]
        out.top = {n: logp.topk(n, dim=-1) for n in wanted if n > 0}
    return out


def _draw(x: torch.Tensor, specs: list[SampleSpec], params: SamplingTensors) -> torch.Tensor:
    """Temperature, top-k, top-p and the seeded draw for every row (greedy rows' draws are ignored)."""
    m, vocab = x.shape
    t = params.temperature
    x = x / torch.where(t > 0, t, torch.ones_like(t))[:, None]                 # greedy rows: any finite value
    ks = [s.top_k for s in specs if 0 < s.top_k < vocab]
    if ks:
        k = params.top_k
        top = x.topk(max(ks), dim=-1).values                                     # [m, max k] descending
        kth = top.gather(1, (k.clamp(1, max(ks)) - 1)[:, None])                  # the k-th largest value
        on = (k > 0) & (k < vocab)
        x = x.masked_fill(on[:, None] & (x < kth), float("-inf"))
    probs = x.softmax(-1)
    if any(s.top_p < 1.0 for s in specs):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p[:, None]
        kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = torch.where((params.top_p < 1.0)[:, None], kept, probs)
    return argmax_rows(probs / _exponential_noise(specs, params, m, vocab, x.device))


def _exponential_noise(specs: list[SampleSpec], params: SamplingTensors, m: int, vocab: int,
                       device: torch.device) -> torch.Tensor:
    """q [m, V] fp32 ~ Exp(1), a function of each row's (seed, output index) only."""
    if device.type == "cpu":
        # exactly the draw torch.multinomial(probs, 1, generator) makes on CPU (see the module docstring)
        q = torch.ones(m, vocab)
        for i, spec in enumerate(specs):
            if spec.temperature != 0.0:
                gen = torch.Generator(device="cpu").manual_seed(noise_key(spec))
                q[i] = torch.empty(vocab).exponential_(1.0, generator=gen)
        return q
    return hash_exponential(params.noise_key, vocab)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), in two halves so no int64 product overflows."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixer (Chris Wellons' lowbias32) on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_exponential(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [m, vocab] fp32 from a counter-based hash of (row key, vocab id), on keys' device.

    keys [m] int64 in [0, 2^63). 24 random bits per value: u = (h + 0.5) / 2^24 in (0, 1), q = -log(u).
    """
    col = _mix32(torch.arange(vocab, device=keys.device, dtype=torch.int64) + _GOLDEN32)       # [V]
    row = _mix32((keys & _MASK32) ^ _mix32((keys >> 32) & _MASK32))                           # [m]
    h = _mix32(col[None, :] ^ row[:, None])                                                   # [m, V]
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(u)


def to_host(out: SampleOutput, specs: list[SampleSpec], req_ids: list[int]) -> list[SampledToken]:
    """One device->host copy of the step's results (started earlier by ``start_host_copy``, or now) -> one
    SampledToken per row."""
    if out.host is not None:
        out.copied.synchronize()                                                 # the one wait of the step
        rows, offset = out.host.tolist(), out.offsets
    else:
        packed, offset = out._packed()
        rows = packed.tolist()                                                   # the one sync of the step
    result = []
    for row, spec, req_id in zip(rows, specs, req_ids):
        token = int(row[0])
        lp = None
        if spec.logprobs is not None:
            n = min(spec.logprobs, out.vocab)
            c = offset.get(n, 0)
            lp = {int(i): v for i, v in zip(row[c:c + n], row[c + n:c + 2 * n])}
            lp[token] = row[1]
        result.append(SampledToken(req_id, token, lp))
    return result


def sample(logits: torch.Tensor, specs: list[SampleSpec], req_ids: list[int],
           params: SamplingTensors | None = None, counts: TokenCounts | None = None) -> list[SampledToken]:
    """logits [m, V], one row per spec -> one SampledToken per row (``params`` staged by the caller, or
    built here)."""
    if params is None:
        params = SamplingTensors.from_specs(specs, logits.device)
    return to_host(sample_tensors(logits, specs, params, counts), specs, req_ids)
