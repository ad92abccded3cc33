import pytest

from dsaserve.parallel.sm_budget import indexer_num_sms, make_pp_group_options, parse_indexer_num_sms


def test_indexer_num_sms():
    assert indexer_num_sms(132, recv_in_flight=False, pp_comm_ctas=1) == 132
    assert indexer_num_sms(132, recv_in_flight=True, pp_comm_ctas=1) == 131
    assert indexer_num_sms(132, recv_in_flight=True, pp_comm_ctas=4) == 128
    assert indexer_num_sms(132, recv_in_flight=True, pp_comm_ctas=0) == 132
    assert indexer_num_sms(8, recv_in_flight=True, pp_comm_ctas=20) == 1  # never below one SM
    assert indexer_num_sms(132, recv_in_flight=True, pp_comm_ctas=1, override=100) == 100
    assert indexer_num_sms(132, recv_in_flight=False, pp_comm_ctas=1, override=500) == 132
    with pytest.raises(ValueError, match="indexer-num-sms"):
        indexer_num_sms(132, True, 1, override=0)
    with pytest.raises(ValueError, match="pp-comm-ctas"):
        indexer_num_sms(132, True, -1)


def test_flag_parsing_and_options():
    assert parse_indexer_num_sms("auto") is None and parse_indexer_num_sms(None) is None
    assert parse_indexer_num_sms("120") == 120
    with pytest.raises(ValueError, match="auto"):
        parse_indexer_num_sms("x")
    assert make_pp_group_options(None) is None
    with pytest.raises(ValueError, match="pp-comm-ctas"):
        make_pp_group_options(0)
    opts = make_pp_group_options(2)  # None on CPU-only torch builds, NCCL options elsewhere
    if opts is not None:
        assert opts.config.max_ctas == 2 and opts.config.min_ctas == 1
