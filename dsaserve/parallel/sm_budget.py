"""The SM budget: how many SMs the persistent indexer kernels may use while a PP transfer is in flight.

Why: a pending NCCL recv (or send) kernel sits on the SMs its CTAs occupy until the data arrives (or the
peer posts the matching recv). A persistent
kernel launched with one program per SM then has programs that cannot start until the recv finishes (a
second wave), which can nearly double its latency. The fix is exact bookkeeping, not a guess:

1. the PP communicator is created with a known, small CTA count (``--pp-comm-ctas``, default 1) through
   NCCL's ``max_ctas``/``min_ctas`` config (``make_pp_group_options``);
2. a rank that has a PP recv posted, or a PP send not yet completed, while it computes runs the indexer
   kernels with ``num_sms = device SMs - pp_comm_ctas`` (``indexer_num_sms``); ``--indexer-num-sms N``
   overrides. A stage-0 rank has no recv, but its send of the previous step is typically still pending
   (its peer is behind), so it reserves like a receiving rank. ``llm.stats()`` counts, per rank, the prefill
   indexer launches that ran reserved (``indexer_sm_budget``).

NCCL's default intra-node P2P recv holds several SMs (9-16 on NVLink), so "minus one" is only right when
the communicator is limited to one CTA. benchmarks/sm_budget.py measures the kernel with and without a
pending recv, reserved and not (docs/BENCHMARKS.md, "SM budget": x1.49 unreserved, x1.008 reserved).
"""

from __future__ import annotations


def indexer_num_sms(device_sms: int, recv_in_flight: bool, pp_comm_ctas: int, override: int | None = None) -> int:
    """SMs for the persistent indexer kernels (prefill logits, fused top-k, paged decode logits) on this rank
    for this step.

    device_sms: the GPU's SM count. recv_in_flight: a PP recv (or send) kernel is pending on this rank
    while the kernel runs. pp_comm_ctas: the CTA limit the PP communicator was created with.
    override: ``--indexer-num-sms N`` (None = "auto"); used as given, clamped to [1, device_sms].
    """
    if device_sms < 1:
        raise ValueError(f"device_sms must be >= 1, got {device_sms}")
    if override is not None:
        if override < 1:
            raise ValueError(f"--indexer-num-sms must be >= 1 or 'auto', got {override}")
        return min(override, device_sms)
    if pp_comm_ctas < 0:
        raise ValueError(f"--pp-comm-ctas must be >= 0, got {pp_comm_ctas}")
    if not recv_in_flight:
        return device_sms
    return max(1, device_sms - pp_comm_ctas)


def parse_indexer_num_sms(value: str | int | None) -> int | None:
    """Parse the ``--indexer-num-sms`` flag: 'auto' (or None) -> None, else a positive int."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--indexer-num-sms must be 'auto' or a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"--indexer-num-sms must be 'auto' or a positive integer, got {value!r}")
    return n


def make_pp_group_options(max_ctas: int | None):
    """``ProcessGroupNCCL.Options`` whose communicator uses at most ``max_ctas`` CTAs (min_ctas = 1).

    Pass it as ``dist.new_group(ranks, backend="nccl", pg_options=...)``. Returns None when ``max_ctas``
    is None (NCCL's default) or when this torch build has no NCCL (CPU-only torch: gloo groups need no
    options), so callers can pass the result through unconditionally.
    """
    if max_ctas is None:
        return None
    if max_ctas < 1:
        raise ValueError(f"--pp-comm-ctas must be >= 1 for an NCCL communicator, got {max_ctas}")
    try:
        import torch.distributed as dist

        options_cls = dist.ProcessGroupNCCL.Options  # absent on CPU-only builds
    except (ImportError, AttributeError):
        return None
    opts = options_cls()
    opts.config.max_ctas = int(max_ctas)
    opts.config.min_ctas = 1
    return opts
