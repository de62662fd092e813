"""gpart saves nothing for backward whose size grows with D: only what the consuming layer saves."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import gpart


def _saved_sizes(model: nn.Module, x: torch.Tensor) -> Counter:
    sizes: Counter = Counter()

    def pack(t):
        sizes[t.numel()] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sizes


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("width", [32, 256])
def test_gpart_saves_only_what_the_frozen_model_saves(width, dropout):
    d = 24
    x = torch.randn(5, width)
    floor = _model(width)  # frozen model whose target weights need gradients: the compute floor
    for name, p in floor.named_parameters():
        p.requires_grad_(name.endswith("weight") and not name.startswith("4"))
    floor_sizes = _saved_sizes(floor, x)

    model = gpart.apply(_model(width), d=d, seed=0, targets=["0", "2"], dropout=dropout).train()
    gpart_sizes = _saved_sizes(model, x)

    extra = gpart_sizes - floor_sizes
    assert all(n <= d for n in extra.elements()), f"gpart saved D-sized tensors: {extra}"
    assert sum(extra.values()) <= 2  # at most the d-sized scales, one per target
    assert gpart.theta(model).grad is not None and gpart.theta(model).grad.abs().sum() > 0
