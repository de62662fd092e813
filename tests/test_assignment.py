"""Stored assignments (``assignment="generator"`` and ``"signed_magnitude"``) against oracles."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Stack, assert_unchanged, columns, deltas, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

import gpart
from gpart.assignment import compact, generator_ids, signed_magnitude


def _dense(ids: torch.Tensor, d: int, isometric: bool) -> torch.Tensor:
    counts = torch.bincount(ids, minlength=d)
    p = torch.zeros(ids.numel(), d, dtype=torch.float64)
    for i, g in enumerate(ids.tolist()):
        p[i, g] = 1.0 / math.sqrt(counts[g]) if isometric else 1.0
    return p


def _reference_signed_magnitude(v: list[float], d: int) -> list[int]:
    """The spec's algorithm, written out in plain Python with float32 keys."""
    import numpy as np

    f = np.float32
    pos = [i for i, x in enumerate(v) if x >= 0]
    neg = [i for i, x in enumerate(v) if not x >= 0]

    def split(idx, k):
        n = len(idx)
        key = [f(abs(f(v[i]))) * f(n + 1) + f(i) / f(n + 1) for i in idx]
        order = sorted(range(n), key=lambda j: key[j])  # sorted() is stable
        out = {}
        for g in range(k):
            for j in order[(g * n) // k : ((g + 1) * n) // k]:
                out[idx[j]] = g
        return out

    ids = [0] * len(v)
    if not neg or not pos:
        for i, g in split(pos or neg, d).items():
            ids[i] = g
        return ids
    if d == 1:
        return ids
    k_neg = round(d * len(neg) / len(v))
    k_pos = d - k_neg
    if k_neg < 1:
        k_neg, k_pos = 1, d - 1
    if k_pos < 1:
        k_pos, k_neg = 1, d - 1
    for i, g in split(neg, k_neg).items():
        ids[i] = g
    for i, g in split(pos, k_pos).items():
        ids[i] = g + k_neg
    return ids


@settings(max_examples=60, deadline=None)
@given(
    v=st.lists(st.floats(-2, 2, width=32), min_size=1, max_size=40),
    data=st.data(),
)
def test_signed_magnitude_matches_the_spec(v, data):
    d = data.draw(st.integers(1, len(v)))
    assert signed_magnitude(torch.tensor(v), d=d).tolist() == _reference_signed_magnitude(v, d)


@pytest.mark.parametrize("assignment", ["generator", "signed_magnitude"])
@pytest.mark.parametrize("isometric", [True, False])
def test_p_is_built_from_the_stored_ids(assignment, isometric):
    torch.manual_seed(0)
    model = Stack([(3, 4), (2, 3)])
    gpart.apply(model, d=7, seed=9, targets=["query", "value"], assignment=assignment, isometric=isometric)
    targets = model.gpart.layout.targets
    if assignment == "generator":
        ids = torch.cat(generator_ids([t.numel for t in targets], d=7, seed=9)).long()
    else:
        values = [model.get_submodule(t.module_name).parametrizations[t.param_name].original for t in targets]
        ids = signed_magnitude(torch.cat([w.reshape(-1) for w in values]), d=7)
    p = columns(model)
    torch.testing.assert_close(p, _dense(ids, 7, isometric), rtol=0, atol=1e-6)


@pytest.mark.parametrize("assignment", ["generator", "signed_magnitude"])
def test_gradient_is_p_transpose_grad_and_recompute_agrees(assignment):
    grads = {}
    for recompute in (True, False):
        torch.manual_seed(0)
        model = Stack([(4, 4)] * 2)
        gpart.apply(
            model,
            d=6,
            seed=2,
            targets=["query", "value"],
            assignment=assignment,
            init_bound=0.4,
            recompute=recompute,
        )
        model.train()
        torch.manual_seed(1)
        model(torch.randn(3, 4)).square().sum().backward()
        grads[recompute] = gpart.theta(model).grad.clone()
    assert torch.equal(grads[True], grads[False])
    torch.manual_seed(0)
    model = Stack([(4, 4)] * 2)
    gpart.apply(model, d=6, seed=2, targets=["query", "value"], assignment=assignment, init_bound=0.4)
    p = columns(model).float()
    with torch.no_grad():
        gpart.theta(model).uniform_(-0.4, 0.4)
    weights = deltas(model)
    r = [torch.randn(w.shape) for w in weights]
    sum((w * x).sum() for w, x in zip(weights, r, strict=True)).backward()
    grad_w = torch.cat([x.reshape(-1) for x in r])
    torch.testing.assert_close(gpart.theta(model).grad, p.T @ grad_w, rtol=1e-5, atol=1e-5)


def test_dropout_with_stored_ids_is_the_same_mask_in_backward():
    """With dropout, the gradient reaches only the kept entries: checked against a no-dropout run
    on the same weights where the masked entries are zeroed by hand."""
    torch.manual_seed(0)
    model = Stack([(8, 8)])
    gpart.apply(model, d=5, seed=2, targets=["query"], assignment="generator", dropout=0.5, init_bound=0.4)
    model.train()
    w = model.layers[0].query.weight
    delta = w - model.layers[0].query.parametrizations.weight.original
    kept = delta != 0
    assert 0 < int(kept.sum()) < delta.numel()  # some entries dropped
    delta.sum().backward()
    theta = gpart.theta(model)
    ids = model.layers[0].query.parametrizations.weight[0].ids.long().reshape(8, 8)
    expected = torch.zeros(5).index_add_(0, ids[kept], torch.full((int(kept.sum()),), 2.0))
    torch.testing.assert_close(theta.grad, expected * model.gpart.scale)


def test_stored_ids_are_compact_and_not_saved(tmp_path):
    model = gpart.apply(Stack([(4, 4)]), d=3, seed=0, targets=["query"], assignment="generator")
    ids = model.layers[0].query.parametrizations.weight[0].ids
    assert ids.dtype == torch.int16 and ids.numel() == 16
    assert compact(torch.zeros(2), 40_000).dtype == torch.int32
    assert not any("ids" in k for k in model.state_dict())
    path = gpart.save(model, tmp_path / "a.safetensors")
    assert '"assignment": "generator"' in gpart.read(path)[1]["config"]
    fresh = gpart.load(Stack([(4, 4)]), path)
    assert torch.equal(fresh.layers[0].query.parametrizations.weight[0].ids, ids)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"assignment": "bogus"}, "assignment='bogus'"),
        ({"assignment": "generator", "seed": 2**64}, "[-2**63, 2**64)"),
    ],
)
def test_bad_assignment_arguments(kwargs, fragment):
    model = Stack([(4, 4)])
    before = snapshot(model)
    with pytest.raises(gpart.ConfigError) as info:
        gpart.apply(model, **{"d": 3, "seed": 0, "targets": ["query"], **kwargs})
    assert fragment in str(info.value)
    assert_unchanged(model, before)


def test_signed_magnitude_needs_real_weights():
    with torch.device("meta"):
        model = Stack([(4, 4)])
    with pytest.raises(gpart.ConfigError, match="meta device"):
        gpart.apply(model, d=3, seed=0, targets=["query"], assignment="signed_magnitude")


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_in_float64(stored, dropout):
    """The custom autograd Functions (hashed and stored ids) pass torch's gradcheck, dropout included."""
    from gpart import _delta

    d, n = 5, 24
    ids = (
        torch.randint(0, d, (n,), generator=torch.Generator().manual_seed(0)).to(torch.int16)
        if stored
        else None
    )
    w0 = torch.randn(4, 6, dtype=torch.float64)
    scale = torch.rand(d, dtype=torch.float64) + 0.5
    theta = torch.randn(d, dtype=torch.float64, requires_grad=True)

    def f(t):
        return _delta.effective(w0, t, scale, start=17, seed=3, dropout=dropout, dropout_key=11, ids=ids)

    assert torch.autograd.gradcheck(f, (theta,))
