"""``scope="block"``: one partition per transformer block, against a brute-force block-diagonal P."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import Stack, assert_unchanged, columns, dense_p, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gpart
from gpart.targets import BLOCK_CONTAINERS, block_of, natural_key, packs, segments


def _oracle(
    model: nn.Module, d: int, seed: int, isometric: bool, containers=BLOCK_CONTAINERS
) -> torch.Tensor:
    """Block-diagonal P: block k (natural order) is the global-scope P of its own entries, with
    ``d_k`` columns (``d // B``, one more for the first ``d % B``) and seed ``seed + k``."""
    targets = model.gpart.layout.targets
    blocks = sorted({block_of(t.module_name, containers) for t in targets}, key=natural_key)
    base, extra = divmod(d, len(blocks))
    widths = [base + (k < extra) for k in range(len(blocks))]
    rows = {b: [] for b in blocks}
    for i, t in enumerate(targets):
        start = sum(x.numel for x in targets[:i])
        rows[block_of(t.module_name, containers)] += range(start, start + t.numel)
    size = sum(t.numel for t in targets)
    p = torch.zeros(size, d, dtype=torch.float64)
    lo = 0
    for k, block in enumerate(blocks):
        local = dense_p(len(rows[block]), widths[k], seed + k, isometric=isometric)
        p[torch.tensor(rows[block]).unsqueeze(1), torch.arange(lo, lo + widths[k])] = local
        lo += widths[k]
    return p


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3),
    seed=st.integers(-(2**64), 2**64),
    isometric=st.booleans(),
    bias=st.sampled_from(["none", "all"]),
    data=st.data(),
)
def test_block_p_is_block_diagonal_against_brute_force(shapes, seed, isometric, bias, data):
    model = Stack(shapes)
    targets = ["query", "value"]
    sizes = [2 * o * i + (2 * o if bias == "all" else 0) for o, i in shapes]
    d = data.draw(st.integers(len(shapes), len(shapes) * min(sizes)))
    gpart.apply(model, d=d, seed=seed, targets=targets, bias=bias, isometric=isometric, scope="block")
    p = columns(model)
    expected = _oracle(model, d, seed, isometric)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
    if isometric:  # orthonormal columns where groups are non-empty
        nonempty = (p != 0).any(dim=0).double()
        torch.testing.assert_close(p.T @ p, torch.diag(nonempty), rtol=0, atol=1e-5)


def test_gradient_of_theta_is_p_transpose_grad():
    torch.manual_seed(0)
    model = Stack([(3, 4), (4, 3), (2, 2)])
    gpart.apply(model, d=9, seed=3, targets=["query", "value"], scope="block", init_bound=0.3)
    p = columns(model).float()
    with torch.no_grad():
        gpart.theta(model).uniform_(-0.3, 0.3)
    theta = gpart.theta(model)
    weights = [(t, torch.randn(t.shape)) for t in model.gpart.layout.targets]
    loss = sum((getattr(model.get_submodule(t.module_name), t.param_name) * r).sum() for t, r in weights)
    loss.backward()
    grad_w = torch.cat([r.reshape(-1) for _, r in weights])
    torch.testing.assert_close(theta.grad, p.T @ grad_w, rtol=1e-5, atol=1e-5)


def test_blocks_take_theta_in_natural_order_and_split_d_evenly():
    model = nn.Module()
    model.blocks = nn.ModuleDict({"10": nn.Linear(2, 2), "2": nn.Linear(2, 2), "1": nn.Linear(2, 2)})
    gpart.apply(model, d=7, seed=5, targets=["10", "2", "1"], scope="block")
    parts = {
        t.name: p
        for t, p in zip(
            model.gpart.layout.targets, segments(model.gpart.layout, d=7, seed=5, scope="block"), strict=True
        )
    }
    assert [
        (parts[n].seed, parts[n].lo, parts[n].hi)
        for n in ("blocks.1.weight", "blocks.2.weight", "blocks.10.weight")
    ] == [
        (5, 0, 3),
        (6, 3, 5),
        (7, 5, 7),
    ]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"targets": ["head"]}, "not inside a numbered transformer block"),
        ({"targets": ["query"], "d": 2}, "at least one coordinate per block, but d=2"),
        ({"targets": ["query"], "d": 30}, "holds only 6 target entries"),
    ],
)
def test_block_scope_errors_leave_the_model_unchanged(kwargs, fragment):
    model = Stack([(2, 3), (2, 3), (2, 3)])
    model.head = nn.Linear(3, 2)
    before = snapshot(model)
    with pytest.raises(gpart.TargetError, match=fragment):
        gpart.apply(model, **{"d": 4, "seed": 0, "scope": "block", **kwargs})
    assert_unchanged(model, before)


def test_unknown_scope_is_a_config_error():
    model = Stack([(2, 3)])
    with pytest.raises(gpart.ConfigError, match="scope='layer'"):
        gpart.apply(model, d=2, seed=0, scope="layer")


def test_packs_never_cross_blocks_and_compute_the_same_bits():
    torch.manual_seed(0)
    model = Stack([(4, 4)] * 3)
    gpart.apply(model, d=12, seed=1, targets=["query", "value", "other"], scope="block", init_bound=0.5)
    state = model.gpart
    parts = segments(state.layout, d=12, seed=1, scope="block")
    for _, members in packs(model, state.layout, parts):
        assert len({parts[i].seed for i in members}) == 1
    assert state.packs  # the three targets of each block are packed
    x = torch.randn(5, 4)
    packed = model(x)
    for _, pack in state.packs:  # the per-target path for every weight
        for member in pack.members:
            member.pack = None
    assert torch.equal(model(x), packed)


def test_block_scope_round_trips_through_files(tmp_path):
    torch.manual_seed(0)
    model = gpart.apply(Stack([(3, 3)] * 2), d=6, seed=2, targets=["query"], scope="block", init_bound=0.5)
    path = gpart.save(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = gpart.load(Stack([(3, 3)] * 2), path)
    assert fresh.gpart.config.scope == "block"
    x = torch.randn(2, 3)
    assert torch.equal(fresh(x), model(x))
    torch.manual_seed(0)
    other = gpart.apply(Stack([(3, 3)] * 2), d=6, seed=2, targets=["query"])
    with pytest.raises(gpart.LayoutError, match="scope: file 'block', model 'global'"):
        gpart.load(other, path)


@pytest.mark.parametrize("assignment", ["hash", "generator"])
def test_block_scope_compiled_kernels_and_traced_model_match_eager(assignment):
    """One compile per variant: block scope with hashed ids, and with stored ids (traced gather)."""
    from gpart import _delta

    if not _delta.compiled_available():
        pytest.skip("torch.compile does not work here")
    outs = {}
    for backend in ("eager", "traced") if assignment != "hash" else ("eager", "compiled", "traced"):
        torch.manual_seed(0)
        model = Stack([(4, 4)] * 2)
        gpart.apply(
            model,
            d=10,
            seed=4,
            targets=["query", "value"],
            scope="block",
            init_bound=0.5,
            backend="eager" if backend == "traced" else backend,
            assignment=assignment,
        )
        run = torch.compile(model) if backend == "traced" else model
        y = run(torch.ones(3, 4)).sum()
        y.backward()
        outs[backend] = (y.detach(), gpart.theta(model).grad.clone())
    for backend in set(outs) - {"eager"}:
        torch.testing.assert_close(outs[backend][0], outs["eager"][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outs[backend][1], outs["eager"][1], rtol=1e-5, atol=1e-6)


class Stages(nn.Module):
    """Blocks under a container the default set does not know: ``stages.<k>.layers.<j>.q``."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Module() for _ in range(2))
        for stage in self.stages:
            stage.layers = nn.ModuleList(nn.Module() for _ in range(2))
            for layer in stage.layers:
                layer.q = nn.Linear(3, 2)


@pytest.mark.parametrize(
    ("containers", "blocks"),
    [
        ((), ["stages.0.layers.0", "stages.0.layers.1", "stages.1.layers.0", "stages.1.layers.1"]),
        (("stages",), ["stages.0", "stages.1"]),
        (("layers", "stages"), ["stages.0", "stages.1"]),  # the first hit from the left wins
    ],
)
def test_block_containers_choose_the_blocks(containers, blocks):
    torch.manual_seed(0)
    model = gpart.apply(Stages(), d=8, seed=3, targets=["q"], scope="block", block_containers=containers)
    targets = model.gpart.layout.targets
    found = sorted(
        {block_of(t.module_name, containers or BLOCK_CONTAINERS) for t in targets}, key=natural_key
    )
    assert found == blocks
    parts = segments(
        model.gpart.layout, d=8, seed=3, scope="block", containers=containers or BLOCK_CONTAINERS
    )
    assert len({p.seed for p in parts}) == len(blocks)
    expected = _oracle(model, 8, 3, True, containers or BLOCK_CONTAINERS)
    torch.testing.assert_close(columns(model), expected, rtol=0, atol=1e-6)


def _stages() -> Stages:
    torch.manual_seed(0)
    return Stages()


def test_block_containers_round_trip_through_both_formats(tmp_path):
    model = gpart.apply(
        _stages(), d=6, seed=1, targets=["q"], scope="block", block_containers=["stages"], init_bound=1.0
    )
    weights = [m.q.weight for s in model.stages for m in s.layers]
    for fresh in (
        gpart.load(_stages(), gpart.save(model, tmp_path / "a.safetensors")),
        gpart.load_peft(_stages(), gpart.save_peft(model, tmp_path / "folder")),
    ):
        assert fresh.gpart.config.block_containers == ("stages",)
        for w, v in zip(weights, [m.q.weight for s in fresh.stages for m in s.layers], strict=True):
            assert torch.equal(w, v)
    assert (
        "block_containers"
        not in gpart.read(
            gpart.save(gpart.apply(Stages(), d=4, seed=0, targets=["q"]), tmp_path / "b.safetensors")
        )[1]["config"]
    )
    default = gpart.apply(Stages(), d=6, seed=1, targets=["q"], scope="block")
    with pytest.raises(gpart.LayoutError, match=r"block_containers: file \('stages',\), model \(\)"):
        gpart.load(default, tmp_path / "a.safetensors")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"block_containers": ["stages"]}, "only locate the blocks of scope='block'"),
        ({"scope": "block", "block_containers": ["a.b"]}, "no dots"),
        ({"scope": "block", "block_containers": [1]}, "no dots"),
        ({"scope": "block", "block_containers": [""]}, "no dots"),
        ({"scope": "block", "block_containers": 3}, "e.g. ['layers']"),
    ],
)
def test_bad_block_containers_are_config_errors(kwargs, fragment):
    model = Stages()
    before = snapshot(model)
    with pytest.raises(gpart.ConfigError, match=re.escape(fragment)):
        gpart.apply(model, d=4, seed=0, targets=["q"], **kwargs)
    assert_unchanged(model, before)
