"""The map theta -> delta against a brute-force dense P, for hypothesis-drawn shapes, d and seeds."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_p
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gpart
from gpart import _delta

shapes = st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3)


class Bag(nn.Module):
    """Raw parameters of arbitrary shapes (no weight/bias naming): the most generic target."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        for k, shape in enumerate(shapes):
            self.register_parameter(f"p{k}", nn.Parameter(torch.randn(shape, dtype=dtype)))


def _setup(shape_list, data, isometric=True):
    model = Bag(shape_list)
    size = sum(p.numel() for p in model.parameters())
    d = data.draw(st.integers(1, size), label="d")
    seed = data.draw(st.integers(-(2**65), 2**65), label="seed")
    names = [f"p{k}" for k in range(len(shape_list))]
    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    gpart.apply(model, d=d, seed=seed, targets=[], target_parameters=names, isometric=isometric)
    return model, names, w0, dense_p(size, d, seed, isometric=isometric)


def _flat(model, names):
    return torch.cat([getattr(model, n).flatten() for n in names])


@settings(max_examples=60, deadline=None)
@given(shape_list=shapes, data=st.data())
def test_dense_p_structure(shape_list, data):
    _, _, _, p = _setup(shape_list, data)
    assert ((p != 0).sum(dim=1) == 1).all()  # one nonzero per row
    nonempty = (p != 0).any(dim=0)
    gram = p.T @ p
    torch.testing.assert_close(gram, torch.diag(nonempty.double()), rtol=0, atol=1e-12)
    theta = torch.randn(p.shape[1], dtype=torch.float64) * nonempty  # empty groups never move
    torch.testing.assert_close((p @ theta).norm(), theta.norm())


@settings(max_examples=60, deadline=None)
@given(shape_list=shapes, data=st.data(), isometric=st.booleans())
def test_forward_and_gradient_match_dense_p(shape_list, data, isometric):
    model, names, w0, p = _setup(shape_list, data, isometric)
    theta = gpart.theta(model)
    with torch.no_grad():
        theta.copy_(torch.randn_like(theta))
    w = _flat(model, names)
    torch.testing.assert_close(w, w0 + p @ theta.detach().double(), rtol=1e-6, atol=1e-6)

    upstream = torch.randn_like(w)
    (w * upstream).sum().backward()
    torch.testing.assert_close(theta.grad.double(), p.T @ upstream, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_float64(dropout):
    d, seed, start, numel = 5, 11, 17, 23
    scale = torch.rand(d, dtype=torch.float64) + 0.5
    theta = torch.randn(d, dtype=torch.float64, requires_grad=True)

    def fn(t):
        return _delta.materialize(
            t, scale, start=start, numel=numel, seed=seed, dropout=dropout, dropout_key=99, chunk=4
        )

    assert torch.autograd.gradcheck(fn, (theta,))
    assert torch.autograd.gradgradcheck(fn, (theta,))


def test_chunk_size_does_not_change_delta_or_gradient():
    d, seed, numel = 13, -5, 1000
    scale = torch.rand(d) + 0.5
    results = []
    for chunk in (1, 7, 64, 1 << 20):
        theta = torch.randn(d, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = _delta.materialize(
            theta, scale, start=3, numel=numel, seed=seed, dropout=0.2, dropout_key=5, chunk=chunk
        )
        out.backward(torch.arange(numel, dtype=torch.float32))
        results.append((out.detach(), theta.grad))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


def test_dropout_statistics_and_scaling():
    d, numel, p = 64, 200_000, 0.25
    theta = torch.ones(d)
    scale = torch.ones(d)
    out = _delta.materialize(theta, scale, start=0, numel=numel, seed=1, dropout=p, dropout_key=123)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) < 0.01
    assert torch.equal(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))
    again = _delta.materialize(theta, scale, start=0, numel=numel, seed=1, dropout=p, dropout_key=123)
    other = _delta.materialize(theta, scale, start=0, numel=numel, seed=1, dropout=p, dropout_key=124)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_dropout_only_in_training_and_never_on_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    gpart.apply(model, d=32, seed=0, bias="all", dropout=0.5, init_bound=1.0)
    layer = model[0]
    w0, b0 = layer.parametrizations.weight.original, layer.parametrizations.bias.original
    model.train()
    assert ((layer.weight - w0) == 0).float().mean() > 0.4  # about half the weight deltas dropped
    assert ((layer.bias - b0) != 0).all()  # bias deltas never dropped
    model.eval()
    assert ((layer.weight - w0) != 0).all()
    ref = _delta.materialize(gpart.theta(model), model.gpart.scale, start=0, numel=64 * 64, seed=0)
    assert torch.equal(layer.weight, w0 + ref.view(64, 64))


def test_two_training_forwards_draw_different_masks():
    model = gpart.apply(nn.Sequential(nn.Linear(32, 32)), d=8, seed=0, dropout=0.5, init_bound=1.0).train()
    assert not torch.equal(model[0].weight, model[0].weight)
    torch.manual_seed(3)
    a = model[0].weight.detach()
    torch.manual_seed(3)
    assert torch.equal(a, model[0].weight)  # the mask follows torch's RNG: reproducible runs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_delta_added_in_fp32_and_rounded_once_to_the_weight_dtype(dtype):
    model = nn.Sequential(nn.Linear(16, 16).to(dtype))
    gpart.apply(model, d=8, seed=0, init_bound=0.5)
    w = model[0].weight
    assert w.dtype == dtype and gpart.theta(model).dtype == torch.float32
    delta = _delta.materialize(gpart.theta(model), model.gpart.scale, start=0, numel=256, seed=0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w0 = model[0].parametrizations.weight.original
    assert torch.equal(w, (w0.to(acc) + delta.view(16, 16).to(acc)).to(dtype))
    w.float().sum().backward()
    assert gpart.theta(model).grad.dtype == torch.float32
