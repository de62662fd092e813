"""Recompute instead of save: same gradients, outer hooks respected, misuse detected, clean removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpart


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    gpart.apply(model, d=12, seed=1, bias="all", **kw)
    with torch.no_grad():
        gpart.theta(model).normal_()
    return model.train()


def _grad(model, x, *, rng=7):
    torch.manual_seed(rng)  # the dropout keys come from torch's RNG
    gpart.theta(model).grad = None
    model(x).square().sum().backward()
    return gpart.theta(model).grad.clone()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_recompute_gives_the_same_gradient(dropout):
    x = torch.randn(4, 8)
    assert torch.equal(_grad(_model(dropout=dropout), x), _grad(_model(dropout=dropout, recompute=False), x))


def test_outer_saved_tensor_hooks_still_apply():
    x = torch.randn(4, 8)
    model = _model()
    calls = []

    def pack(t):
        calls.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    assert calls  # activations went through the user's hooks
    grad = gpart.theta(model).grad.clone()
    gpart.theta(model).grad = None
    with torch.autograd.graph.save_on_cpu():
        model(x).sum().backward()
    assert torch.equal(gpart.theta(model).grad, grad)


def test_in_place_change_of_theta_before_backward_is_an_error():
    model = _model()
    loss = model(torch.randn(4, 8)).sum()
    with torch.no_grad():
        gpart.theta(model).add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        loss.backward()


def test_module_used_twice_in_one_graph():
    model = _model()
    layer = model[2]
    x = torch.randn(4, 16)
    loss = (layer(x) + layer(torch.tanh(layer(x)))).sum()
    loss.backward()
    grad = gpart.theta(model).grad.clone()
    gpart.theta(model).grad = None
    model.gpart.recipes = None  # same computation, saving the weights instead
    (layer(x) + layer(torch.tanh(layer(x)))).sum().backward()
    torch.testing.assert_close(gpart.theta(model).grad, grad, rtol=0, atol=0)


def test_state_is_balanced_after_errors_and_no_grad():
    model = _model()
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 3))  # wrong width: the forward fails inside a target
    recipes = model.gpart.recipes
    assert recipes.stack == [] and recipes.live == {}
    with torch.no_grad():
        model(torch.randn(4, 8))
    assert recipes.stack == [] and recipes.live == {}
    model(torch.randn(4, 8)).sum().backward()
    assert recipes.stack == [] and recipes.live == {}


def test_hooks_are_removed_with_gpart():
    model = _model()
    assert len(model[0]._forward_pre_hooks) == 1 and len(model[0]._forward_hooks_always_called) == 1
    gpart.remove(model)
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks
    assert not model[0]._forward_hooks_always_called
