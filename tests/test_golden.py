"""The authors' implementation's merged deltas, reproduced to float32 rounding."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Stack, golden

import gpart
from gpart import _delta


def _theta(d: int) -> torch.Tensor:
    return torch.tensor([math.sin(0.37 * j + 0.1) for j in range(d)], dtype=torch.float32)


@pytest.mark.parametrize(
    "case", golden()["models"], ids=lambda c: f"d{c['d']}-{c.get('options') or 'default'}"
)
def test_golden_model_deltas(case):
    shapes = [tuple(s) for s in case["targets_in_order_shapes"][::2]]
    torch.manual_seed(0)
    model = Stack(shapes)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    gpart.apply(model, d=case["d"], seed=case["seed"], targets=["query", "value"], **case["options"])
    assert [t.name for t in model.gpart.layout.targets] == [e["name"] for e in case["deltas"]]
    with torch.no_grad():
        gpart.theta(model).copy_(_theta(case["d"]))
    state = model.gpart
    pure = {
        t.name: _delta.materialize(
            state.theta, state.scale, start=t.offset, numel=t.numel, seed=state.config.seed
        )
        .detach()
        .double()
        for t in state.layout.targets
    }
    gpart.merge(model)
    merged = dict(model.named_parameters())
    total_sumsq = 0.0
    for expected in case["deltas"]:
        name = expected["name"]
        delta = pure[name]
        # The reference reports merged-minus-base in float32: one rounding of W0 + delta away.
        torch.testing.assert_close(delta[:8].tolist(), expected["first8"], rtol=0, atol=1e-7)
        assert float(delta.sum()) == pytest.approx(expected["sum"], rel=1e-6, abs=1e-6)
        assert float((delta**2).sum()) == pytest.approx(expected["sumsq"], rel=1e-6)
        total_sumsq += float((delta**2).sum())
        # End to end: merge adds exactly the kernel's delta, rounded once into float32.
        w0 = base[name]
        assert list(w0.shape) == expected["shape"]
        assert torch.equal(merged[name].detach(), w0 + delta.float().view_as(w0))
    assert total_sumsq == pytest.approx(case["total_sumsq"], rel=1e-6)
    untouched = [n for n in base if n not in {d["name"] for d in case["deltas"]}]
    assert untouched and all(torch.equal(merged[n], base[n]) for n in untouched)


@pytest.mark.parametrize("case", golden()["models"][:2], ids=["small", "64x64"])
def test_golden_isometry_in_exact_arithmetic(case):
    """Without the W0 round-trip the deltas' sum of squares equals ||theta||^2 (float64 check)."""
    shapes = [tuple(s) for s in case["targets_in_order_shapes"][::2]]
    model = gpart.apply(Stack(shapes), d=case["d"], seed=case["seed"], targets=["query", "value"])
    theta = _theta(case["d"])
    with torch.no_grad():
        gpart.theta(model).copy_(theta)
    total = 0.0
    for layer in model.layers:
        for name in ("query", "value"):
            m = getattr(layer, name)
            total += float(((m.weight - m.parametrizations.weight.original).detach().double() ** 2).sum())
    assert total == pytest.approx(float((theta.double() ** 2).sum()), rel=1e-5)
    assert total == pytest.approx(case["theta_sumsq"], rel=1e-5)
