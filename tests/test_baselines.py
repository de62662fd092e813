"""The runners' baselines (examples/common/adapters.py) against dense oracles on tiny layers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from common import adapters
from common import config as C

KINDS = ["lora", "vera", "unilora", "condlora"]


class Block(nn.Module):
    """Two numbered layers with square ``query``/``value`` projections (and a non-target)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(width, width), "value": nn.Linear(width, width)})
            for _ in range(2)
        )
        self.other = nn.Linear(width, width)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["value"](torch.tanh(layer["query"](x))))
        return self.other(x)


def config(kind: str, **overrides):
    cfg = C.ADAPTERS[kind]()
    cfg.dropout = 0.0
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = Block().double()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    params, _ = adapters.setup(model, config(kind, **overrides), head=[], seed=seed)
    return model, base, params


def randomize(params) -> None:
    """Give every trainable tensor a random value (starting values hide the oracle's terms)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def wrapped(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, adapters.AdapterLinear)]


def oracle(model, name: str, layer) -> torch.Tensor:
    """delta W of one wrapped layer, entry by entry from the method's definition."""
    w = layer.base.weight.detach()
    out_f, in_f = w.shape
    if isinstance(layer, adapters.LoRALinear):
        a, b = layer.lora_a.detach(), layer.lora_b.detach()
        r = a.shape[0]
        return torch.tensor(
            [
                [layer.scaling * sum(b[i, k] * a[k, j] for k in range(r)) for j in range(in_f)]
                for i in range(out_f)
            ],
            dtype=w.dtype,
        )
    if isinstance(layer, adapters.VeRALinear):
        a, b = layer.vera_a, layer.vera_b
        ld, lb = layer.lambda_d.detach(), layer.lambda_b.detach()
        return torch.tensor(
            [
                [lb[i] * sum(b[i, k] * ld[k] * a[k, j] for k in range(a.shape[0])) for j in range(in_f)]
                for i in range(out_f)
            ],
            dtype=w.dtype,
        )
    if isinstance(layer, adapters.UniLoRALinear):
        theta = layer.theta.detach()
        ia, ib, sa, sb = layer.idx_a, layer.idx_b, layer.scale_a, layer.scale_b
        r = ia.shape[0]
        a = [[theta[ia[k, j]] * sa[k, j] for j in range(in_f)] for k in range(r)]
        b = [[theta[ib[i, k]] * sb[i, k] for k in range(r)] for i in range(out_f)]
        return torch.tensor(
            [[sum(b[i][k] * a[k][j] for k in range(r)) for j in range(in_f)] for i in range(out_f)],
            dtype=w.dtype,
        )
    if isinstance(layer, adapters.CondLoRALinear):
        na, nb = layer.net_a.weight.detach(), layer.net_b.weight.detach()  # (r, in)
        la = w @ na.T  # lora_A rows: (out, r)
        lb = w @ nb.T  # lora_B: (out, r)
        r = na.shape[0]
        return torch.tensor(
            [
                [layer.scaling * sum(lb[i, k] * la[j, k] for k in range(r)) for j in range(in_f)]
                for i in range(out_f)
            ],
            dtype=w.dtype,
        )
    raise AssertionError(name)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_matches_the_dense_oracle_in_forward_and_merge(kind):
    model, _, params = build(kind, r=3) if kind != "unilora" else build(kind, r=3, theta_d_length=50)
    randomize(params)
    x = torch.randn(5, 6, dtype=torch.float64)
    for name, layer in wrapped(model):
        delta = oracle(model, name, layer)
        assert delta.abs().max() > 0
        torch.testing.assert_close(layer.delta_weight().detach(), delta)
        torch.testing.assert_close(layer(x) - layer.base(x), x @ delta.T)
    assert len(wrapped(model)) == 4
    with torch.no_grad():
        y = model(x)
        with adapters.inference(model):
            torch.testing.assert_close(model(x), y)
            assert all(m.merged_weight is not None for _, m in wrapped(model))
        assert all(m.merged_weight is None for _, m in wrapped(model))
        adapters.merge(model)
        assert not wrapped(model) and all(isinstance(m, nn.Linear) for m in model.layers[0].values())
        torch.testing.assert_close(model(x), y)


@pytest.mark.parametrize("kind", ["lora", "vera", "condlora"])
def test_init_leaves_the_outputs_unchanged(kind):
    torch.manual_seed(1)
    model = Block().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    before = model(x)
    adapters.setup(model, config(kind), head=[], seed=0)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_unilora_starts_away_from_the_base_model_unless_its_bound_is_zero():
    x = torch.randn(4, 6, dtype=torch.float64)
    outputs = {}
    for bound in (0.02, 0.0):
        torch.manual_seed(1)
        model = Block().double()
        before = model(x)
        adapters.setup(model, config("unilora", init_theta_d_bound=bound, theta_d_length=40), head=[], seed=0)
        outputs[bound] = (model(x) - before).abs().max().item()
    assert outputs[0.02] > 0 and outputs[0.0] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_training_drives_the_loss_down(kind):
    model, _, params = build(kind, seed=3)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("base.weight"))
    teacher, _, taught = build(kind, seed=3)  # same frozen weights and projections, other adapter values
    randomize(taught)
    with torch.no_grad():
        for p in taught:
            p.mul_(0.3)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = teacher(x).detach()
    opt = torch.optim.Adam(params, lr=0.02)
    losses = []
    for _ in range(60):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (kind, losses[0], losses[-1])


def test_unilora_assignment_is_balanced_seeded_and_scaled():
    ids = adapters.unilora_ids(1003, 10, seed=5)
    counts = np.bincount(ids, minlength=10)
    assert counts.sum() == 1003 and counts.max() - counts.min() == 1 and (counts == 101).sum() == 3
    assert (adapters.unilora_ids(1003, 10, seed=5) == ids).all()
    assert not (adapters.unilora_ids(1003, 10, seed=6) == ids).all()
    model, _, _ = build("unilora", r=2, theta_d_length=7)
    layers = [m for _, m in wrapped(model)]
    every = torch.cat([t.flatten() for m in layers for t in (m.idx_a, m.idx_b)])
    n = torch.bincount(every, minlength=7).double()
    for m in layers:  # 1/sqrt(uses of the index), over all targets
        torch.testing.assert_close(m.scale_a.double(), n[m.idx_a].rsqrt())
        torch.testing.assert_close(m.scale_b.double(), n[m.idx_b].rsqrt())
    assert len({id(m.theta) for m in layers}) == 1


def test_vera_matrices_are_shared_and_seeded_by_the_prng_key():
    model, _, _ = build("vera")
    first = [m.vera_a for _, m in wrapped(model)]
    assert all(a.data_ptr() == first[0].data_ptr() for a in first)  # one shared matrix, sliced
    g = torch.Generator().manual_seed(0)
    a = nn.init.kaiming_uniform_(torch.empty(8, 6), a=math.sqrt(5), generator=g)
    torch.testing.assert_close(first[0].float(), a)
    other, _, _ = build("vera", projection_prng_key=1)
    assert not torch.equal(wrapped(other)[0][1].vera_a, first[0])


def test_condlora_shares_one_pair_per_target_name_and_needs_square_weights():
    model, _, params = build("condlora")
    pairs = {(id(m.net_a), id(m.net_b)) for _, m in wrapped(model)}
    assert len(pairs) == 2 and sum(p.numel() for p in params) == 2 * 2 * 8 * 6
    rect = nn.Sequential()
    rect.query = nn.Linear(4, 6)
    with pytest.raises(ValueError, match="square weights"):
        adapters.setup(rect, config("condlora"), head=[], seed=0)


def test_no_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"set adapter\.targets"):
        adapters.setup(Block(), config("vera", targets=["nothing"]), head=[], seed=0)
