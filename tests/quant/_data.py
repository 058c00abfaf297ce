"""Tiny seeded synthetic data of low intrinsic dimension, shared by the quantizer tests."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))


def low_rank(n: int, d: int, *, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """x = z @ W + noise: n points of intrinsic dimension ``rank`` in ``d`` dims, on ``DEVICE``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    return x.to(DEVICE)
