"""Shared helpers: oracles (pure-Python hash, dense P), model snapshots, golden data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gpart

DATA = Path(__file__).parent / "data"

# Kernel tests run on every device present; CI has only the CPU, a GPU machine adds "cuda".
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
U64 = (1 << 64) - 1


def ref_group_id(seed: int, i: int, d: int) -> int:
    """The spec's SplitMix64 rule on Python ints: the oracle for gpart.partition."""
    z = (seed + i + 0x9E3779B97F4A7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    z ^= z >> 31
    return z % d


def dense_p(size: int, d: int, seed: int, *, isometric: bool = True) -> torch.Tensor:
    """Brute-force P (size x d, float64): P[i, g(i)] = 1/sqrt(n_g(i)) (or 1)."""
    ids = [ref_group_id(seed, i, d) for i in range(size)]
    counts = [0] * d
    for g in ids:
        counts[g] += 1
    p = torch.zeros(size, d, dtype=torch.float64)
    for i, g in enumerate(ids):
        p[i, g] = 1.0 / math.sqrt(counts[g]) if isometric else 1.0
    return p


def deltas(model: nn.Module) -> list[torch.Tensor]:
    """Each gpart target's current ``W - W0`` (differentiable in theta), in layout order."""
    out = []
    for t in model.gpart.layout.targets:
        module = model.get_submodule(t.module_name)
        out.append(getattr(module, t.param_name) - module.parametrizations[t.param_name].original)
    return out


def columns(model: nn.Module) -> torch.Tensor:
    """P (D x d, float64) read off an adapted model: column j is the flat delta for theta = e_j."""
    theta = gpart.theta(model)
    cols = []
    for j in range(theta.numel()):
        with torch.no_grad():
            theta.zero_()
            theta[j] = 1.0
            cols.append(torch.cat([w.reshape(-1).double() for w in deltas(model)]))
    return torch.stack(cols, dim=1)


def golden() -> dict:
    return json.loads((DATA / "official_partition.json").read_text())


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: tensors, their identities, flags, classes, children."""
    return {
        "params": [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
        "buffers": [(n, b.detach().clone()) for n, b in model.named_buffers()],
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "hooks": [
            (n, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_hooks_always_called))
            for n, m in model.named_modules()
        ],
        "attrs": sorted(vars(model)),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert after["attrs"] == before["attrs"]
    assert [(n, i, r) for n, i, r, _ in after["params"]] == [(n, i, r) for n, i, r, _ in before["params"]]
    for (_, _, _, a), (_, _, _, b) in zip(after["params"], before["params"], strict=True):
        assert torch.equal(a, b)
    for (_, a), (_, b) in zip(after["buffers"], before["buffers"], strict=True):
        assert torch.equal(a, b)


class Triple(nn.Module):
    """One layer of the golden models: query, value, other."""

    def __init__(self, out_f: int, in_f: int, bias: bool = True) -> None:
        super().__init__()
        self.query = nn.Linear(in_f, out_f, bias=bias)
        self.value = nn.Linear(in_f, out_f, bias=bias)
        self.other = nn.Linear(in_f, out_f, bias=bias)


class Stack(nn.Module):
    """``layers.i.{query,value,other}`` with the given (out, in) shapes."""

    def __init__(self, shapes: list[tuple[int, int]], bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Triple(o, i, bias) for o, i in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # only for shape-compatible stacks
        for layer in self.layers:
            x = torch.tanh(layer.query(x) + layer.value(x) + layer.other(x))
        return x


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
