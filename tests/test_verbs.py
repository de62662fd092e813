"""apply / merge / remove / disabled / cached / theta / summary on a plain torch model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import parametrize

import gpart
from gpart.parametrization import GPartParametrization


def _trained(model: nn.Module, **kw) -> nn.Module:
    gpart.apply(model, d=20, seed=3, **kw)
    with torch.no_grad():
        gpart.theta(model).normal_()
    return model


def test_apply_registers_theta_once_and_freezes_base(mlp):
    model = gpart.apply(mlp, d=20, seed=3, targets=["0", "2"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["gpart.theta"]
    assert sum(p is gpart.theta(model) for p in model.parameters()) == 1
    assert [k for k in model.state_dict() if "gpart" in k] == ["gpart.theta"]
    assert gpart.theta(model).dtype == torch.float32 and not gpart.theta(model).any()
    assert parametrize.is_parametrized(model[0], "weight") and not parametrize.is_parametrized(
        model[0], "bias"
    )
    assert not parametrize.is_parametrized(model[4])


def test_all_linear_excludes_trainable_modules(mlp):
    model = gpart.apply(mlp, d=20, seed=3, trainable=["4"])
    assert [t.name for t in model.gpart.layout.targets] == ["0.weight", "2.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "4.weight",
        "4.bias",
        "gpart.theta",
    ]


def test_freeze_false_keeps_other_flags(mlp):
    model = gpart.apply(mlp, d=20, seed=3, targets=["0"], freeze=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags["0.parametrizations.weight.original"] is False
    assert flags["0.bias"] and flags["2.weight"] and flags["gpart.theta"]


def test_theta_zero_leaves_outputs_unchanged(mlp):
    x = torch.randn(4, 6)
    y0 = mlp(x)
    assert torch.equal(gpart.apply(mlp, d=20, seed=3)(x), y0)


def test_merge_equals_parametrized_forward_and_leaves_plain_model(mlp):
    params = {n: p for n, p in mlp.named_parameters()}
    flags = {n: p.requires_grad for n, p in mlp.named_parameters()}
    model = _trained(mlp, bias="all", dropout=0.3).train()
    x = torch.randn(4, 6)
    with torch.no_grad():
        y = model.eval()(x)
    model.train()  # merging in training mode must still not apply dropout
    gpart.merge(model)
    assert torch.equal(model(x), y)
    assert not hasattr(model, "gpart") and not parametrize.is_parametrized(model[0])
    assert type(model[0]) is nn.Linear
    assert {n: p for n, p in model.named_parameters()} == params  # same Parameter objects
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_remove_restores_bit_exact_same_objects(mlp):
    before = snapshot(mlp)
    model = _trained(mlp, bias="all", trainable=["4"])
    model(torch.randn(2, 6)).sum().backward()
    gpart.remove(model)
    assert_unchanged(model, before)


def test_disabled_context(mlp):
    x = torch.randn(3, 6)
    y0 = mlp(x)
    model = _trained(mlp)
    y = model(x)
    with gpart.disabled(model):
        assert torch.equal(model(x), y0)
        with gpart.disabled(model):
            pass
        assert torch.equal(model(x), y0)  # nesting keeps it disabled
    assert torch.equal(model(x), y)
    with pytest.raises(KeyError), gpart.disabled(model):
        raise KeyError  # an exception inside still re-enables
    assert torch.equal(model(x), y)


def test_cached_context_computes_each_delta_once(mlp, monkeypatch):
    model = _trained(mlp)
    calls = []
    original = GPartParametrization.forward
    monkeypatch.setattr(GPartParametrization, "forward", lambda self, w: calls.append(1) or original(self, w))
    x = torch.randn(3, 6)
    with torch.no_grad():
        y = model(x)
        calls.clear()
        with gpart.cached(model):
            for _ in range(5):
                assert torch.equal(model(x), y)
    assert len(calls) == 3  # once per target for five forwards


def test_summary(mlp):
    model = gpart.apply(mlp, d=20, seed=3, targets=["0", "2"], trainable=["4"])
    s = gpart.summary(model)
    assert (s.theta, s.other_trainable, s.trainable) == (20, 12 * 3 + 3, 20 + 39)
    assert s.total == sum(p.numel() for p in model.parameters())
    assert s.percent == pytest.approx(100 * 59 / s.total)
    assert "theta: 20" in str(s)


def test_theta_stays_fp32_when_model_is_cast(mlp):
    model = gpart.apply(mlp, d=20, seed=3)
    theta = gpart.theta(model)
    model.to(torch.bfloat16)
    assert gpart.theta(model) is theta and theta.dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16
    model(torch.randn(2, 6, dtype=torch.bfloat16)).float().sum().backward()
    assert theta.grad.dtype == torch.float32 and theta.grad.abs().sum() > 0


def test_deepcopy_keeps_theta_link(mlp):
    model = _trained(mlp)
    clone = copy.deepcopy(model)
    x = torch.randn(2, 6)
    assert torch.equal(clone(x), model(x))
    with torch.no_grad():
        gpart.theta(clone).zero_()
    assert not torch.equal(clone(x), model(x))  # the copy's parametrizations follow the copy's theta


@pytest.mark.parametrize("verb", [gpart.merge, gpart.remove])
def test_merging_or_removing_a_deep_copy_leaves_the_original_working(mlp, verb):
    """Deep copies share torch's generated Parametrized* class; undoing gpart on one must not
    strip the other's properties."""
    model = _trained(mlp, bias="all")
    x = torch.randn(2, 6)
    y = model(x)
    copied = verb(copy.deepcopy(model))
    assert torch.equal(model(x), y) and parametrize.is_parametrized(model[0], "weight")
    assert type(copied[0]) is nn.Linear
    gpart.remove(model)
    assert type(model[0]) is nn.Linear


def test_parametrizations_follow_a_swapped_theta(mlp):
    """Distributed wrappers replace parameter objects: the delta must follow the new one."""
    model = _trained(mlp)
    x = torch.randn(2, 6)
    y = model(x)
    model.gpart.theta = nn.Parameter(torch.zeros(20))
    with gpart.disabled(model):
        y0 = model(x)
    assert torch.equal(model(x), y0) and not torch.equal(y, y0)


def test_training_reduces_loss(mlp):
    torch.manual_seed(1)
    x, target = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = gpart.apply(mlp, d=40, seed=0)
    opt = torch.optim.AdamW([gpart.theta(model)], lr=0.05)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_sequential_root_still_computes(mlp):
    x = torch.randn(2, 6)
    y = mlp(x)
    assert torch.equal(gpart.apply(mlp, d=4, seed=0)(x), y)  # the state module is an identity
