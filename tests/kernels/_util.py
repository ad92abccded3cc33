"""Helpers shared by the kernel tests."""

import pytest
import torch

triton = pytest.importorskip("triton")


def fp8_randn(*shape, gen=None, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(torch.float8_e4m3fn)


def ragged_ranges(s: int, skv: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Random [ks, ke) per row, including empty rows (ks >= ke) and full rows."""
    ks = torch.randint(0, skv, (s,), generator=gen, dtype=torch.int32)
    ke = torch.randint(0, skv + 1, (s,), generator=gen, dtype=torch.int32)
    if s >= 3:
        ks[0], ke[0] = 0, skv  # full row
        ks[1], ke[1] = 5, 5  # empty
        ks[2], ke[2] = 9, 3  # inverted = empty
    return ks, ke
