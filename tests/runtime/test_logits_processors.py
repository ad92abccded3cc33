"""The vectorized logits processors (grammar bitmask, logit_bias, min_tokens bans, presence / frequency /
repetition penalties) and their token-count state against the plain per-request reference
(tests/runtime/reference_sampling.py): same processed logits and, on fixed seeds, the same sampled tokens for
batches that mix every kind of request; the counts table follows the plan stream (resets, prompt / output
split, fork copies, growth, the static decode path's device-side update)."""

from __future__ import annotations

import random

import pytest
import torch

from dsaserve.runtime import sampler as S
from dsaserve.runtime.decode_inputs import DecodeInputs
from dsaserve.runtime.logits_processors import TokenCounts, apply_token_bitmask
from dsaserve.runtime.plan import CountsRef, PlanEntry, SampleSpec, StepPlan
from tests.runtime.reference_sampling import draw, process_row

V = 97   # odd: the last bitmask word is partly used


def _bitmask(rng: random.Random, allowed: set[int]) -> torch.Tensor:
    words = [0] * (-(-V // 32))
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def _case(rng: random.Random, i: int) -> dict:
    """One request: a history and a random mix of processors (some rows use none)."""
    prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 12))]
    output = [rng.randrange(V) for _ in range(rng.randrange(0, 9))]
    kind = i % 6
    c = dict(prompt=prompt, output=output, temperature=[0.0, 0.7, 1.0, 1.3][i % 4], seed=rng.randrange(1 << 40),
             top_k=[-1, 5][i % 2], top_p=[1.0, 0.9][(i // 2) % 2])
    if kind in (1, 5):
        c.update(presence=rng.uniform(-2, 2), frequency=rng.uniform(-2, 2), repetition=rng.uniform(0.5, 2.0))
    if kind in (2, 5):
        c["logit_bias"] = {rng.randrange(V): rng.uniform(-100, 100) for _ in range(3)}
    if kind in (3, 5):
        c["banned"] = sorted({rng.randrange(V) for _ in range(2)})
    if kind in (4, 5):
        c["allowed"] = {rng.randrange(V) for _ in range(20)}
    return c


def _specs_and_counts(cases: list[dict]) -> tuple[list[SampleSpec], TokenCounts]:
    counts = TokenCounts(V, torch.device("cpu"))
    entries, specs = [], []
    for i, c in enumerate(cases):
        pen = "presence" in c
        slot = 3 * i + 1 if pen else -1                    # sparse slots: the table grows past them
        spec = SampleSpec(c["temperature"], c["top_p"], c["top_k"], c["seed"], len(c["output"]), None,
                          presence_penalty=c.get("presence", 0.0), frequency_penalty=c.get("frequency", 0.0),
                          repetition_penalty=c.get("repetition", 1.0), counts_slot=slot,
                          logit_bias=tuple(sorted(c.get("logit_bias", {}).items())),
                          banned_token_ids=tuple(c.get("banned", ())),
                          allowed_bitmask=_bitmask(random.Random(0), c["allowed"]) if "allowed" in c else None)
        specs.append(spec)
        if pen:   # the request's prompt and outputs so far, recorded as a recompute chunk would carry them
            entries.append(PlanEntry(i, c["prompt"] + c["output"], 0, [0], counts=CountsRef(slot, len(c["prompt"]))))
    counts.apply_plan(StepPlan(0, False, entries))
    return specs, counts


def _reference(logits: torch.Tensor, cases: list[dict]) -> tuple[torch.Tensor, list[int]]:
    rows, tokens = [], []
    for row, c in zip(logits, cases):
        mask = _bitmask(random.Random(0), c["allowed"]).tolist() if "allowed" in c else None
        x = process_row(row, prompt=c["prompt"], output=c["output"], presence=c.get("presence", 0.0),
                        frequency=c.get("frequency", 0.0), repetition=c.get("repetition", 1.0),
                        logit_bias=c.get("logit_bias"), banned=c.get("banned", ()), allowed_mask=mask)
        rows.append(x)
        tokens.append(draw(x, temperature=c["temperature"], seed=c["seed"], index=len(c["output"]),
                           top_k=c["top_k"], top_p=c["top_p"]))
    return torch.stack(rows), tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processors_equal_the_reference(seed, monkeypatch):
    rng = random.Random(seed)
    cases = [_case(rng, i) for i in range(24)]
    logits = torch.randn(len(cases), V, generator=torch.Generator().manual_seed(seed)) * 3
    specs, counts = _specs_and_counts(cases)
    want_x, want_tokens = _reference(logits, cases)
    seen = {}

    def spy(specs_, ctx):                         # the logits after the built-in processors, before sampling
        def keep(x):
            seen["x"] = x.clone()
            return x
        return keep

    monkeypatch.setattr(S, "LOGITS_PROCESSORS", S.LOGITS_PROCESSORS + [spy])
    out = S.sample(logits, specs, list(range(len(cases))), counts=counts)
    got_x = seen["x"]
    assert torch.equal(torch.isinf(got_x), torch.isinf(want_x))
    finite = torch.isfinite(want_x)
    assert torch.allclose(got_x[finite], want_x[finite], rtol=1e-6, atol=1e-5)
    assert [t.token_id for t in out] == want_tokens
    # a control: without the processors the tokens differ (the test can fail)
    plain = S.sample(logits, [SampleSpec(s.temperature, s.top_p, s.top_k, s.seed, s.output_index, None)
                              for s in specs], list(range(len(cases))))
    assert [t.token_id for t in plain] != want_tokens


def test_banned_and_masked_tokens_are_never_sampled():
    logits = torch.zeros(4, V)
    logits[:, 7] = 50.0                                   # overwhelmingly likely, but banned / masked / biased away
    specs = [SampleSpec(1.0, 1.0, -1, s, 0, None, banned_token_ids=(7,)) for s in range(2)] + \
            [SampleSpec(1.0, 1.0, -1, 5, 0, None, allowed_bitmask=_bitmask(random.Random(0), {3, 9})),
             SampleSpec(0.0, 1.0, -1, 6, 0, None, logit_bias=((7, -100.0), (11, 60.0)))]
    toks = [t.token_id for t in S.sample(logits, specs, [0, 1, 2, 3])]
    assert toks[0] != 7 and toks[1] != 7 and toks[2] in (3, 9) and toks[3] == 11


def test_bitmask_matches_bits():
    rng = random.Random(3)
    allowed = [{rng.randrange(V) for _ in range(30)} for _ in range(3)]
    mask = torch.stack([_bitmask(rng, a) for a in allowed])
    x = apply_token_bitmask(torch.zeros(3, V), mask)
    for r, a in enumerate(allowed):
        assert {int(t) for t in torch.isfinite(x[r]).nonzero()} == a


def test_counts_follow_the_plan_stream():
    """Reset at position 0, prompt / output split at prompt_len (a chunk may straddle it), decode tokens count
    as output, fork copies happen before the step's tokens, and the table grows keeping its rows."""
    c = TokenCounts(V, torch.device("cpu"))
    c.apply_plan(StepPlan(0, False, [PlanEntry(0, [1, 2, 2], 0, [0], counts=CountsRef(0, 5))]))
    c.apply_plan(StepPlan(1, False, [PlanEntry(0, [3, 4, 4, 4], 3, [0], counts=CountsRef(0, 5))]))  # 3,4 prompt
    assert sorted(c.prompt[0].nonzero().flatten().tolist()) == [1, 2, 3, 4]
    assert c.output[0, 4] == 2 and int(c.output[0].sum()) == 2
    c.apply_plan(StepPlan(2, True, [PlanEntry(0, [9], 7, [0], counts=CountsRef(0, 5))], counts_copies=[(0, 20)]))
    assert c.capacity >= 21 and c.output[20, 4] == 2 and c.output[20, 9] == 0       # copied before the token
    assert c.output[0, 9] == 1 and torch.equal(c.prompt[20], c.prompt[0])
    c.apply_plan(StepPlan(3, False, [PlanEntry(0, [5], 0, [0], counts=CountsRef(0, 1))]))   # slot reused: reset
    assert c.prompt[0].nonzero().flatten().tolist() == [5] and int(c.output[0].sum()) == 0
    assert c.output[20, 4] == 2                                                              # other rows kept


def test_static_decode_update_equals_the_plan_update():
    """A static decode step records its tokens from the staged device inputs (padding rows -> sink row)."""
    a, b = TokenCounts(V, torch.device("cpu")), TokenCounts(V, torch.device("cpu"))
    entries = [PlanEntry(i, [t], 10, [0], counts=CountsRef(s, 4) if s >= 0 else None)
               for i, (t, s) in enumerate([(5, 2), (6, -1), (5, 0), (7, 2)])]
    specs = [SampleSpec(0.0, 1.0, -1, 1, 6, None, counts_slot=e.counts.slot if e.counts else -1) for e in entries]
    for i, e in enumerate(entries):
        e.sample = specs[i]
    plan = StepPlan(0, True, entries)
    a.apply_plan(plan)
    inputs = DecodeInputs(8, 4, torch.device("cpu"), 16, 999)
    views = inputs.stage(entries, 8, 2)                  # 4 padding rows
    b.apply_plan(plan, record_entries=False)
    b.record_decode(views.sampling.counts_slot, views.input_ids)
    assert torch.equal(a.output[:a.capacity], b.output[:b.capacity])
    assert int(b.output[b.sink].sum()) == 5                # the untracked row and the padding rows
    st = views.sampling
    assert st.counts_slot[:4].tolist() == [2, -1, 0, 2] and st.repetition[4:].tolist() == [1.0] * 4


def test_staged_penalty_parameters():
    specs = [SampleSpec(0.5, 0.9, 3, 1, 2, None, presence_penalty=0.25, frequency_penalty=-1.5,
                        repetition_penalty=1.75, counts_slot=4)]
    inputs = DecodeInputs(4, 2, torch.device("cpu"), 16, 999)
    views = inputs.stage([PlanEntry(0, [1], 3, [0], specs[0])], 2, 1)
    want = S.SamplingTensors.from_specs(specs, torch.device("cpu"))
    for name in S.SamplingTensors.FIELDS:
        assert torch.equal(getattr(views.sampling.rows(1), name), getattr(want, name)), name
