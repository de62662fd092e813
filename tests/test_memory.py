"""Memory: gpart keeps nothing for backward whose size grows with D beyond what the frozen model keeps.

The saved tensors are counted with an outer ``saved_tensors_hooks``; gpart's recompute hooks pass
every tensor that is not a gpart weight on to it. Only *new* memory counts: a saved parameter
(e.g. a frozen W0) costs nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpart


def _new_saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    loss.backward()
    return sum(seen.values())


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )


def _floor(width: int) -> nn.Module:
    """The frozen model computing gradients of the target weights only: what any GPart must do."""
    model = _model(width)
    for name, p in model.named_parameters():
        p.requires_grad_(name in ("0.weight", "2.weight"))
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("width", [32, 256])
def test_saved_bytes_do_not_grow_with_d(width, dropout):
    d, x = 24, torch.randn(5, width)
    floor = _new_saved_bytes(_floor(width), x)
    model = gpart.apply(_model(width), d=d, seed=0, targets=["0", "2"], dropout=dropout).train()
    extra = _new_saved_bytes(model, x) - floor
    assert extra <= 2 * 4 * d  # at most the d-sized scale of each target's autograd node
    assert gpart.theta(model).grad.abs().sum() > 0


@pytest.mark.parametrize("width", [32, 256])
def test_without_recompute_the_weights_are_saved(width):
    """The counter above can see the difference: recompute=False keeps W0 + delta (D values)."""
    x = torch.randn(5, width)
    floor = _new_saved_bytes(_floor(width), x)
    model = gpart.apply(_model(width), d=24, seed=0, targets=["0", "2"], recompute=False)
    extra = _new_saved_bytes(model, x) - floor
    assert extra >= 4 * (
        width * width
    )  # at least the second layer's W0 + delta (the first needs no input grad)
