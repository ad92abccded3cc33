"""EngineArgs: every option is a documented flag, and bad values are rejected naming the option."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from dsaserve.args import EngineArgs
from dsaserve.config import ConfigError


def test_every_field_is_a_flag_with_real_help():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(EngineArgs):
        action = actions[f.name]
        assert action.option_strings == ["--" + f.name.replace("_", "-")]
        words = action.help.replace("(default: %(default)s)", "").split()
        assert len(words) >= 3, f"--{f.name} has no real help text: {action.help!r}"
    text = parser.format_help()                   # renders every help string (a stray % would raise here)
    assert "--attention-backend {auto,reference,triton}" in text and "--moe-backend {auto,grouped,loop}" in text
    assert "--quantization {auto,fp8,none}" in text


def test_cli_round_trip_keeps_the_defaults():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli(parser.parse_args([])) == EngineArgs()
    args = EngineArgs.from_cli(parser.parse_args(["--cp-size", "2", "--attention-backend", "triton"]))
    assert (args.cp_size, args.attention_backend) == (2, "triton")
    args = EngineArgs.from_cli(parser.parse_args(["--enforce-eager", "--skip-warmup",
                                                  "--prefill-chunk-while-decoding", "256"]))
    assert (args.enforce_eager, args.skip_warmup, args.prefill_chunk_while_decoding) == (True, True, 256)


@pytest.mark.parametrize("field, value", [
    ("attention_backend", "kernels"), ("indexer_mode", "int4"), ("cp_split", "ring"), ("dtype", "int8"),
    ("quantization", "fp4"), ("moe_backend", "ep"), ("load_format", "gguf"), ("pp_transfer", "all"),
    ("chunked_prefill_size", 0), ("prefill_chunk_while_decoding", 0), ("enforce_eager", "yes"), ("page_size", -1),
    ("indexer_num_sms", "many"), ("comm_timeout_s", 0),
])
def test_bad_values_name_the_option(field, value):
    with pytest.raises(ConfigError, match=field):
        EngineArgs(**{field: value}).validate()
