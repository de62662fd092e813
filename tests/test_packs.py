"""Packs: the small targets of one module's forward computed in one kernel call.

A pack must be invisible but for speed: the same weights bit for bit, the same dropout masks
whichever path computed a weight, the same gradients (to float summation order), checkpointing
and grad modes respected, nothing left behind by remove.
"""

from __future__ import annotations

import pytest
import torch
from conftest import snapshot
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

import gpart
from gpart import _delta, parametrization
from gpart.targets import packs, resolve


class Blocks(nn.Module):
    """Residual blocks of two small linears each, in a ModuleList (which has no forward)."""

    def __init__(self, width: int = 16, depth: int = 3, *, drop: float = 0.0, ckpt: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(drop), nn.Linear(width, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 2)
        self.ckpt = ckpt

    def forward(self, x):
        for block in self.blocks:
            x = x + (checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x))
        return self.head(x)


def _apply(model, **kw):
    return gpart.apply(model, d=24, seed=5, trainable=["head"], init_bound=0.05, **kw)


def _grad(model, x):
    torch.manual_seed(123)  # the same dropout draws (layers and delta keys) for every variant
    with parametrize.cached():  # a weight read again in a hook is the one the forward used
        loss = model(x).square().sum()
    loss.backward()
    return gpart.theta(model).grad.clone()


def test_plan_groups_consecutive_small_targets_under_the_innermost_owner_with_a_forward(monkeypatch):
    model = Blocks(width=16, depth=3)
    layout = resolve(model, targets="all-linear", exclude=["head"])
    # blocks.i.0 and blocks.i.3: their common ancestor "blocks" is a ModuleList, so the root owns.
    assert packs(model, layout) == [("", [0, 1, 2, 3, 4, 5])]
    monkeypatch.setattr(gpart.targets, "PACK_LIMIT", 2 * 16 * 16)  # two targets a pack at most
    assert packs(model, layout) == [("blocks.0", [0, 1]), ("blocks.1", [2, 3]), ("blocks.2", [4, 5])]
    monkeypatch.setattr(gpart.targets, "PACK_TARGET", 16 * 16 - 1)  # every target too big
    assert packs(model, layout) == []


def test_a_big_target_splits_the_runs(monkeypatch):
    small = [nn.Linear(4, 4) for _ in range(4)]
    model = nn.Sequential(*small[:2], nn.Linear(64, 64), *small[2:])
    monkeypatch.setattr(gpart.targets, "PACK_TARGET", 16)
    layout = resolve(model, targets="all-linear")
    assert packs(model, layout) == [("", [0, 1]), ("", [3, 4])]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_packed_weights_equal_the_per_target_ones_bit_for_bit(backend, dropout, monkeypatch):
    """Within one session a pack and the per-target path use the same key: same masks, same bits."""
    if backend == "compiled" and not _delta.compiled_available():
        pytest.skip("torch.compile unavailable")
    x = torch.randn(5, 16)
    torch.manual_seed(0)
    packed = _apply(Blocks(drop=0.1), dropout=dropout, backend=backend).train()
    torch.manual_seed(0)
    unpacked = _apply(Blocks(drop=0.1), dropout=dropout, backend=backend).train()
    monkeypatch.setattr(parametrization.Pack, "_fill", lambda self, dropout: None)  # every take misses
    weights = {}

    def grab(model, tag):
        def keep(module, args, output, name):
            weights[tag, name] = module.weight  # cached: the weight this forward used

        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "head":
                module.register_forward_hook(lambda m, i, o, n=name: keep(m, i, o, n))

    grab(packed, "p")
    grab(unpacked, "u")
    g_unpacked = _grad(unpacked, x)
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(parametrization.Pack, "_fill", _spy(parametrization.Pack._fill, calls))
    g_packed = _grad(packed, x)
    assert calls == [1]  # one pack call for the whole forward
    for name in [n for tag, n in weights if tag == "p"]:
        assert torch.equal(weights["p", name], weights["u", name]), name
    torch.testing.assert_close(g_packed, g_unpacked, rtol=1e-5, atol=1e-7)
    assert g_packed.abs().sum() > 0


def _spy(fill, calls):
    def wrapped(self, dropout):
        calls.append(1)
        return fill(self, dropout)

    return wrapped


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointed_blocks_train_like_plain_ones(dropout):
    """A checkpoint replay finds its forward's dropout key (and repeats its draw), so the gradient
    is the plain one, with layer dropout drawing from the same RNG in between."""
    x = torch.randn(5, 16)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _apply(Blocks(drop=0.1, ckpt=ckpt), dropout=dropout).train()
        grads.append(_grad(model, x))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_a_pack_made_without_grad_never_serves_a_forward_with_grad():
    """The first member runs under no_grad (a frozen prefix), the next with grad: theta still
    gets the second one's gradient."""

    class Prefix(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            with torch.no_grad():
                x = self.a(x)
            return self.b(x)

    model = gpart.apply(Prefix(), d=4, seed=0)
    assert model.gpart.packs
    model(torch.randn(3, 8)).sum().backward()
    assert gpart.theta(model).grad.abs().sum() > 0


def test_weights_accessed_outside_the_owner_and_twice_take_the_per_target_path():
    model = _apply(Blocks())
    w = model.blocks[0][0].weight  # outside any forward: no session
    out1 = model(torch.ones(2, 16))
    assert torch.equal(model.blocks[0][0].weight, w)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    twice = gpart.apply(Twice(), d=4, seed=0, init_bound=0.1)
    y = twice(torch.ones(2, 8))
    ref = torch.ones(2, 8)
    for layer in (twice.a, twice.a, twice.b):
        ref = nn.functional.linear(ref, layer.weight, layer.bias)
    assert torch.equal(y, ref) and out1.shape == (2, 2)


def test_remove_drops_the_pack_hooks_and_a_failed_apply_adds_none():
    model = Blocks()
    before = snapshot(model)
    with pytest.raises(gpart.ConfigError):
        gpart.apply(model, d=10**9, seed=0)
    assert snapshot(model)["hooks"] == before["hooks"]
    _apply(model)
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks_always_called) == 1
    gpart.remove(model)
    assert snapshot(model)["hooks"] == before["hooks"]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_dropout_state_is_built_once_not_per_step(backend):
    """The per-target scalars are cached per (target, setting), never per dropout key: steps
    after the first build nothing (on a GPU a build is a host to device copy)."""
    if backend == "compiled" and not _delta.compiled_available():
        pytest.skip("torch.compile unavailable")
    model = nn.Sequential(nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 300))  # big: not packed
    gpart.apply(model, d=64, seed=0, dropout=0.1, backend=backend)
    assert not model.gpart.packs
    x = torch.randn(4, 300)
    model(x).sum().backward()
    misses = _delta._static_scalars.cache_info().misses
    for _ in range(3):
        model(x).sum().backward()
    assert _delta._static_scalars.cache_info().misses == misses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_forward_never_waits_for_the_gpu(backend, dropout):
    model = Blocks(width=64).cuda()
    model.blocks.append(nn.Sequential(nn.Linear(64, 1024), nn.Linear(1024, 64)))  # per-target path too
    gpart.apply(model, d=512, seed=0, dropout=dropout, backend=backend, trainable=["head"]).train()
    x = torch.randn(8, 64, device="cuda")
    model(x).sum().backward()  # first call: compilation, cached scalars
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(x).sum()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss.backward()
