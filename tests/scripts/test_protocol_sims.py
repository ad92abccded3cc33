"""The thread simulations of the Gluon kernels' barrier protocols (benchmarks/*_protocol_sim.py) run clean, and
the turns simulation fails under each of its mutations (so it can tell a broken protocol from a working one).
The kernels themselves only run on a GPU; these check the designs they follow."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def _sim(name, *args):
    return subprocess.run([sys.executable, os.path.join(BENCH, name), *args], capture_output=True, text=True,
                          timeout=240)


def test_pair_protocol_sim_runs_clean():
    p = _sim("pair_protocol_sim.py", "10")
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr


def test_turns_protocol_sim_runs_clean():
    p = _sim("turns_protocol_sim.py", "40")
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr


@pytest.mark.parametrize("mutation", ["no_thread_barrier", "tile_order_numbers", "no_dummy_turn", "idle_skips_turns",
                                      "parity_flipped"])
def test_turns_protocol_sim_catches_each_mutation(mutation):
    p = _sim("turns_protocol_sim.py", "40", "--mutate", mutation)
    assert p.returncode != 0 and ("deadlock" in p.stderr or "issued as" in p.stderr), p.stdout + p.stderr
