"""``projection="fastfood"``: the structured map against its dense matrix, gradients, state, dtypes."""

from __future__ import annotations

import pytest
import torch
from conftest import Stack, assert_unchanged, columns, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import gpart
from gpart import fastfood


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _dense(seed: int, d: int, size: int, gains: torch.Tensor) -> torch.Tensor:
    """P (size x d, float64) as the product c H G Pi H B diag(gains), block by block."""
    signs, gaussians, perms = fastfood.draw(seed, d, size)
    length = signs.shape[1]
    h = _hadamard(length)
    blocks = []
    for b in range(signs.shape[0]):
        pi = torch.zeros(length, length, dtype=torch.float64)
        pi[torch.arange(length), perms[b].long()] = 1.0  # (Pi v)[k] = v[perm[k]]
        m = h @ torch.diag(gaussians[b].double()) @ pi @ h @ torch.diag(signs[b].double())
        blocks.append(m[:, :d])
    p = torch.cat(blocks)[:size] / (size * length) ** 0.5
    return p * gains.double()


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
    seed=st.integers(0, 2**40),
    isometric=st.booleans(),
    data=st.data(),
)
def test_structured_map_equals_its_dense_matrix(shapes, seed, isometric, data):
    model = Stack(shapes)
    size = 2 * sum(o * i for o, i in shapes)
    d = data.draw(st.integers(2, size))
    gpart.apply(model, d=d, seed=seed, targets=["query", "value"], projection="fastfood", isometric=isometric)
    p = columns(model)
    gains = torch.ones(d) if isometric else fastfood.gains(seed, d)
    torch.testing.assert_close(p, _dense(seed, d, size, gains), rtol=1e-4, atol=1e-6)


def test_gradient_is_p_transpose_grad_and_dropout_masks_it():
    torch.manual_seed(0)
    model = gpart.apply(
        Stack([(4, 4)]), d=6, seed=3, targets=["query"], projection="fastfood", init_bound=0.3
    )
    p = _dense(3, 6, 16, torch.ones(6)).float()
    w = model.layers[0].query.weight
    r = torch.randn(4, 4)
    (w * r).sum().backward()
    torch.testing.assert_close(gpart.theta(model).grad, p.T @ r.reshape(-1), rtol=1e-5, atol=1e-6)
    model = gpart.apply(Stack([(4, 4)]), d=6, seed=3, targets=["query"], projection="fastfood", dropout=0.5)
    with torch.no_grad():
        gpart.theta(model).fill_(1.0)
    model.train()
    delta = model.layers[0].query.weight - model.layers[0].query.parametrizations.weight.original
    full = (p @ torch.ones(6)).reshape(4, 4)
    kept = delta != 0
    assert 0 < int(kept.sum()) < 16
    torch.testing.assert_close(delta[kept], 2 * full[kept], rtol=1e-5, atol=1e-6)


def test_state_costs_what_the_reference_stores_and_survives_half():
    model = gpart.apply(Stack([(8, 8)] * 2), d=20, seed=1, targets=["query", "value"], projection="fastfood")
    state = model.gpart
    length, blocks = 32, -(-256 // 32)
    assert state.ff_signs.dtype == torch.int8 and state.ff_perms.dtype == torch.int32
    nbytes = sum(t.numel() * t.element_size() for t in (state.ff_signs, state.ff_gauss, state.ff_perms))
    assert nbytes == blocks * length * (1 + 4 + 4)
    assert not any(k.startswith("gpart.ff_") for k in model.state_dict())
    gauss = state.ff_gauss.clone()
    model.half()
    assert torch.equal(state.ff_gauss, gauss)  # exact float32 values, not rounded through half


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"scope": "block"}, "projection='fastfood' with scope='block'"),
        ({"assignment": "generator"}, "assignment='generator'"),
        ({"isometric": False, "d": 1}, "needs d >= 2"),
        ({"projection": "dense"}, "projection='dense'"),
    ],
)
def test_bad_fastfood_arguments(kwargs, fragment):
    model = Stack([(4, 4)] * 2)
    before = snapshot(model)
    with pytest.raises(gpart.ConfigError) as info:
        gpart.apply(model, **{"d": 4, "seed": 0, "targets": ["query"], "projection": "fastfood", **kwargs})
    assert fragment in str(info.value)
    assert_unchanged(model, before)


def test_gradcheck_in_float64():
    signs, gaussians, perms = fastfood.draw(5, 6, 40)
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: fastfood.project(t, signs, gaussians, perms, size=40, start=5, numel=20), (theta,)
    )
