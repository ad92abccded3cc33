"""Prompt logprobs: the logprob of every prompt token given the tokens before it (OpenAI ``echo`` +
``logprobs``, ``SamplingParams(prompt_logprobs=n)``).

The row of prompt token i predicts token i + 1, so a chunk's rows give the logprobs of the chunk's tokens
1.. and of the first token after the chunk (``PlanEntry.next_token_id``). The last stage computes them for
the rows it holds: under context parallelism each rank takes its own CP shard of the chunk's rows, so no
hidden state is gathered; rank 0 merges the parts by position. The logits are computed in blocks of rows
(a 16K-token chunk times a 129K vocabulary would not fit at once) and stay on the device until
``to_host`` (one copy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dsaserve.runtime.plan import PromptLogprobs, StepPlan

_BLOCK_ELEMENTS = 1 << 25          # logits computed at once: rows x vocab (128 MB of fp32)


@dataclass
class PromptRows:
    """The local rows of one step whose prompt logprobs this rank computes (one list entry per row)."""

    rows: list[int] = field(default_factory=list)        # local row (of this rank's hidden states)
    targets: list[int] = field(default_factory=list)     # the token whose logprob the row gives
    positions: list[int] = field(default_factory=list)   # that token's position in the prompt
    req_ids: list[int] = field(default_factory=list)
    top_n: list[int] = field(default_factory=list)       # top logprobs asked for (0: the token's own only)


def select_rows(plan: StepPlan, row_of_flat: torch.Tensor) -> PromptRows | None:
    """The rows of ``plan`` with a prompt logprob to compute on this rank. ``row_of_flat`` [num_tokens]:
    the local row of each flat token index of the step, -1 when another rank holds it."""
    out = PromptRows()
    flat = 0
    row_of = row_of_flat.tolist()
    for e in plan.entries:
        n = len(e.token_ids)
        if e.prompt_logprobs is not None:
            targets = e.token_ids[1:] + ([e.next_token_id] if e.next_token_id is not None else [])
            for j, target in enumerate(targets):
                row = row_of[flat + j]
                if row >= 0:
                    out.rows.append(row)
                    out.targets.append(target)
                    out.positions.append(e.start_pos + j + 1)
                    out.req_ids.append(e.req_id)
                    out.top_n.append(e.prompt_logprobs)
        flat += n
    return out if out.rows else None


@dataclass
class PendingPromptLogprobs:
    """Device results: per top-n group, (row indices into PromptRows, target logprob, top vals, top ids)."""

    rows: PromptRows
    groups: list[tuple[list[int], torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def compute(rows: PromptRows, logits_of: Callable[[torch.Tensor], torch.Tensor], vocab: int,
            device: torch.device) -> PendingPromptLogprobs:
    """``logits_of(local_rows)`` -> [k, vocab] logits of those rows. Queued on the device, no host sync."""
    block = max(1, _BLOCK_ELEMENTS // vocab)
    groups = []
    for n in sorted(set(rows.top_n)):
        members = [i for i, k in enumerate(rows.top_n) if k == n]
        lps, vals, ids = [], [], []
        for b in range(0, len(members), block):
            part = members[b:b + block]
            local = torch.tensor([rows.rows[i] for i in part], device=device)
            target = torch.tensor([rows.targets[i] for i in part], device=device)
            logp = logits_of(local).float().log_softmax(-1)                       # [k, V]
            lps.append(logp.gather(1, target[:, None])[:, 0])
            if n > 0:
                top = logp.topk(min(n, vocab), dim=-1)
                vals.append(top.values)
                ids.append(top.indices)
        groups.append((members, torch.cat(lps), torch.cat(vals) if vals else None, torch.cat(ids) if ids else None))
    return PendingPromptLogprobs(rows, groups)


def to_host(pending: PendingPromptLogprobs) -> list[PromptLogprobs]:
    """One device->host copy -> one ``PromptLogprobs`` per request of the step."""
    parts = []
    for _, lp, vals, ids in pending.groups:
        cols = [lp.double()[:, None]]
        if vals is not None:
            cols += [ids.double(), vals.double()]
        parts.append(torch.cat(cols, dim=1).flatten())
    flat = torch.cat(parts).tolist() if parts else []
    r = pending.rows
    per_row: dict[int, dict[int, float]] = {}
    at = 0
    for members, _, vals, _ in pending.groups:
        n = 0 if vals is None else vals.shape[1]
        width = 1 + 2 * n
        for k, i in enumerate(members):
            row = flat[at + k * width: at + (k + 1) * width]
            lp = {int(t): v for t, v in zip(row[1:1 + n], row[1 + n:1 + 2 * n])}
            lp[r.targets[i]] = row[0]
            per_row[i] = lp
        at += len(members) * width
    out: dict[int, PromptLogprobs] = {}
    for i in range(len(r.rows)):
        item = out.setdefault(r.req_ids[i], PromptLogprobs(r.req_ids[i], [], []))
        item.positions.append(r.positions[i])
        item.logprobs.append(per_row[i])
    return list(out.values())
