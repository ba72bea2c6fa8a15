"""The persistent InfoNCE forward's grid (issue 20, item 2): load balance over the SMs at every size, without a GPU.

`_forward_tiling` picks super-tiles for `programs` resident programs (SM count x blocks per SM, read from the device
at run time); the kernel walks them round-robin. The old grid gave 576 programs for every N from 32k to 1M, 529 of
them full, on 132 SMs at one block per SM: the busiest SM did 5 programs' work while the mean was 576/132 = 4.36,
a balance of 0.87 at best and 0.82 counting the ragged edge. Balance here is recomputed independently: mean tiles per
program over the tiles of the busiest program, from the super-tile layout the tiling implies.
"""
from __future__ import annotations

import math

import pytest
import torch

import ville_kernels.infonce as infonce_mod

pytest.importorskip("triton")


def _balance(blocks_n, blocks_m, tiles_n, tiles_m, programs):
    work = []
    for rb in range(0, blocks_n, tiles_n):
        for cb in range(0, blocks_m, tiles_m):
            work.append(min(tiles_n, blocks_n - rb) * min(tiles_m, blocks_m - cb))
    busiest = max(sum(work[p::programs]) for p in range(min(programs, len(work))))
    return blocks_n * blocks_m / (min(programs, len(work)) * busiest)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "row"])
@pytest.mark.parametrize("sms", [132, 114, 108], ids=["h100-sxm", "h100-pcie", "a100"])
def test_forward_grid_keeps_every_sm_busy(sms, symmetric):
    block_n, block_m, _, _ = infonce_mod._block_sizes(torch.bfloat16, False, backward=False, symmetric=symmetric)
    programs = infonce_mod._BLOCKS_PER_SM * sms
    for n in (32768, 65536, 100000, 262144, 524288, 1 << 20):
        blocks_n, blocks_m = -(-n // block_n), -(-n // block_m)
        tiles_n, tiles_m, claimed = infonce_mod._forward_tiling(blocks_n, blocks_m, programs)
        balance = _balance(blocks_n, blocks_m, tiles_n, tiles_m, programs)
        assert abs(balance - claimed) < 1e-9
        assert balance >= infonce_mod._BALANCE, f"N={n} on {sms} SMs: balance {balance:.3f}"
        supers = -(-blocks_n // tiles_n) * -(-blocks_m // tiles_m)
        # the scratch is O((N + M) * sqrt(super-tiles)): at most 8 super-tiles per program (plus edge slack)
        assert supers <= 9 * programs, f"N={n}: {supers} super-tiles for {programs} programs"


def test_old_grid_was_imbalanced():
    """The previous one-super-tile-per-program grid, recomputed: below 0.9 on 132 SMs at N = 64k and 1M."""
    for n in (65536, 1 << 20):
        blocks = n // 128
        t = max(1, math.isqrt(blocks * blocks // (4 * 132)))
        assert _balance(blocks, blocks, t, t, 132) < 0.9
