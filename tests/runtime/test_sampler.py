"""The vectorized sampler against the per-request sampler it replaced (kept here as the oracle): same greedy
tokens, same seeded draws, same logprobs on CPU, for batches mixing every kind of request; the logits
processor hook; and the device noise's statelessness."""

from __future__ import annotations

import pytest
import torch

from dsaserve.runtime import sampler as S
from dsaserve.runtime.plan import SampleSpec


# ---- the per-request sampler before vectorization (the oracle) -------------------------------------------
def _old_draw(logits: torch.Tensor, spec: SampleSpec) -> int:
    if spec.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / spec.temperature
    if spec.top_k > 0 and spec.top_k < logits.numel():
        kth = logits.topk(spec.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if spec.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= spec.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator(device="cpu").manual_seed((spec.seed * 1_000_003 + spec.output_index) % (1 << 63))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _old_sample(logits, specs, req_ids):
    out = []
    for row, spec, req_id in zip(logits.float(), specs, req_ids):
        token = _old_draw(row, spec)
        lp = None
        if spec.logprobs is not None:
            logp = row.log_softmax(-1)
            k = min(spec.logprobs, logp.numel())
            vals, ids = logp.topk(k) if k > 0 else (logp[:0], torch.zeros(0, dtype=torch.long))
            lp = {int(i): float(v) for i, v in zip(ids.tolist(), vals.tolist())}
            lp[token] = float(logp[token])
        out.append((req_id, token, lp))
    return out


def _specs(rng: torch.Generator, m: int) -> list[SampleSpec]:
    kinds = [
        dict(temperature=0.0, top_p=1.0, top_k=-1),                 # greedy
        dict(temperature=1.0, top_p=1.0, top_k=-1),                 # plain sampling
        dict(temperature=0.7, top_p=1.0, top_k=5),                  # top-k
        dict(temperature=1.3, top_p=0.8, top_k=-1),                 # top-p
        dict(temperature=0.9, top_p=0.5, top_k=40),                 # both
        dict(temperature=2.0, top_p=1e-6, top_k=-1),                # top-p keeps only the best token
        dict(temperature=1.0, top_p=1.0, top_k=10_000),             # top-k >= vocab: off
    ]
    out = []
    for i in range(m):
        kind = kinds[i % len(kinds)]
        seed = int(torch.randint(0, 1 << 56, (1,), generator=rng))
        out.append(SampleSpec(seed=seed, output_index=int(torch.randint(0, 300, (1,), generator=rng)),
                              logprobs=[None, 0, 3, 7][i % 4], **kind))
    return out


@pytest.mark.parametrize("vocab", [7, 512, 3001])
def test_vectorized_equals_the_per_request_sampler(vocab):
    rng = torch.Generator().manual_seed(vocab)
    for trial in range(6):
        m = 1 + trial * 5
        logits = torch.randn(m, vocab, generator=rng) * (1 + trial)
        if trial == 3:
            logits[:, : vocab // 2] = logits[:, :1]            # ties in the top-k / top-p boundaries
        specs = _specs(rng, m)
        ids = list(range(100, 100 + m))
        new = [(t.req_id, t.token_id, t.logprobs) for t in S.sample(logits, specs, ids)]
        old = _old_sample(logits, specs, ids)
        for (rid, tok, lp), (orid, otok, olp) in zip(new, old):
            assert (rid, tok) == (orid, otok), f"vocab {vocab} trial {trial} request {rid}"
            assert lp == olp, f"vocab {vocab} trial {trial} request {rid}: logprobs differ"


def test_samples_do_not_depend_on_the_batch():
    """A request's draw is a function of its own (seed, index) and logits: alone or in any batch."""
    rng = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 400, generator=rng)
    specs = _specs(rng, 9)
    together = [t.token_id for t in S.sample(logits, specs, list(range(9)))]
    alone = [S.sample(logits[i:i + 1], [specs[i]], [i])[0].token_id for i in range(9)]
    reordered = S.sample(logits.flip(0), specs[::-1], list(range(9))[::-1])
    assert together == alone == [t.token_id for t in reordered][::-1]


def test_sample_tensors_stays_on_the_device_until_to_host(monkeypatch):
    """sample_tensors returns tensors; only to_host turns them into Python values (one copy)."""
    logits = torch.randn(4, 50)
    specs = _specs(torch.Generator().manual_seed(1), 4)
    out = S.sample_tensors(logits, specs, S.SamplingTensors.from_specs(specs, logits.device))
    assert out.tokens.shape == (4,) and out.tokens.dtype == torch.int64
    assert sorted(out.top) == [3, 7] and out.top[7][1].shape == (4, 7) and out.token_logprob.shape == (4,)
    toks = S.to_host(out, specs, [0, 1, 2, 3])
    assert [t.token_id for t in toks] == out.tokens.tolist()


def test_a_logits_processor_plugs_in(monkeypatch):
    """A factory appended to LOGITS_PROCESSORS changes the logits before greedy and sampling; logprobs stay
    those of the raw logits."""
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5))
    best = logits.argmax(-1)
    specs = [SampleSpec(0.0, 1.0, -1, 1, 0, 2), SampleSpec(1.0, 1.0, -1, 2, 0, None),
             SampleSpec(0.0, 1.0, -1, 3, 0, None)]

    def ban_best(specs_, ctx):
        def apply(x):
            return x.scatter(1, best[:, None].to(ctx.device), float("-inf"))
        return apply

    monkeypatch.setattr(S, "LOGITS_PROCESSORS", [ban_best])
    out = S.sample(logits, specs, [0, 1, 2])
    assert all(t.token_id != int(b) for t, b in zip(out, best))
    assert out[0].token_id == int(logits[0].topk(2).indices[1])             # greedy picks the runner-up
    assert int(best[0]) in out[0].logprobs                                   # raw logprobs: best still listed


def test_hash_noise_is_exponential_and_stateless():
    keys = torch.tensor([0, 1, 12345678901234, (1 << 63) - 1])
    q = S.hash_exponential(keys, 20000)
    assert q.shape == (4, 20000) and torch.isfinite(q).all() and (q > 0).all()
    assert torch.equal(q, S.hash_exponential(keys, 20000))                  # a pure function of the keys
    assert torch.equal(q[2:3], S.hash_exponential(keys[2:3], 20000))       # of each row's own key
    assert abs(float(q.mean()) - 1.0) < 0.03 and abs(float(q.var()) - 1.0) < 0.06   # Exp(1): mean 1, var 1
    assert (q[0] - q[1]).abs().mean() > 0.5                                  # neighbouring keys: other draws


def test_argmax_rows_is_argmax_with_ties_and_nan():
    """The two-stage argmax returns x.argmax(-1) exactly: first maximal column across groups and within one,
    NaN as the maximum, short or odd rows through argmax itself."""
    from dsaserve.runtime.sampler import ARGMAX_GROUPS, argmax_rows

    g = torch.Generator().manual_seed(0)
    v = ARGMAX_GROUPS * 101
    x = torch.randn(6, v, generator=g)
    x[1, 7] = x[1, v - 3] = x[1].max() + 1            # a tie across groups: the first column wins
    x[2, 200:205] = 50.0                               # a tie inside one group
    x[3] = 0.0                                         # all equal: column 0
    x[4, 999] = float("nan")                           # NaN is the maximum
    x[5, :] = float("-inf")
    x[5, v - 1] = -1e30
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert argmax_rows(x).tolist()[:5] == [int(x[0].argmax()), 7, 200, 0, 999]
    for cols in (ARGMAX_GROUPS * 64 - 1, 1000, 5):     # not a multiple of the groups / short: plain argmax
        y = torch.randn(3, cols, generator=g)
        assert torch.equal(argmax_rows(y), y.argmax(-1))
