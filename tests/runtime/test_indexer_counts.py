"""The prefill indexer counts ``llm.stats()`` reports (``indexer_sm_budget``): launches, launches on a reserved SM
budget, and the rows the threshold top-k redid, summed on the device step by step and read only by the
snapshot."""

import torch

from dsaserve.model.batch import IndexerLaunches
from dsaserve.runtime.runner import PrefillIndexerLaunches


def test_steps_add_up_and_the_redo_counter_is_read_at_snapshot_time():
    total = PrefillIndexerLaunches()
    assert total.snapshot()["threshold_redo_rows"] == 0  # no threshold top-k ran: nothing to read

    first = IndexerLaunches()
    first.add(None)
    first.add(64)
    first.redo_counter(torch.device("cpu")).add_(3)        # what mqa_topk_threshold adds on the device
    assert first.redo_counter(torch.device("cpu")) is first.redo_rows  # one counter a step
    total.record(first)

    second = IndexerLaunches()
    second.add(None)
    second.redo_counter(torch.device("cpu")).add_(2)
    total.record(second)
    total.record(IndexerLaunches())                        # a step without the threshold path

    snap = total.snapshot()
    assert snap == {"prefills": 3, "launches": 3, "reserved_launches": 1,
                    "last_prefill": {"launches": 0, "reserved_launches": 0}, "threshold_redo_rows": 5}
    assert first.redo_rows.item() == 3  # the steps' own counters are not changed by the sum
    total.reset()
    assert total.snapshot()["threshold_redo_rows"] == 0
