"""Several named adapters on one model: coexistence, the active set, per-name verbs, hot swap.

The oracle is each adapter alone: its dense P read off a copy of the base model carrying only
that adapter (``conftest.columns``); with several adapters a target weight must be
``W0 + sum of P_a theta_a`` over the active ones, and each theta's gradient ``P_a^T dL/dW``.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, columns, snapshot
from safetensors.torch import save_file
from torch import nn

import gpart
from gpart import ConfigError, GPartError, LayoutError, StateError, _delta

# name -> apply options: overlapping targets, a bias, stored ids, different d and seeds
ADAPTERS = {
    "default": {"d": 6, "seed": 1, "targets": ["0", "2"]},
    "b": {"d": 9, "seed": 2, "targets": ["2", "4"], "bias": "all"},
    "c": {"d": 4, "seed": 3, "targets": ["0"], "assignment": "generator"},
}


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def oracle(name: str) -> tuple[torch.Tensor, list]:
    """P (D x d, float64) of adapter ``name`` alone, and its layout's targets."""
    alone = gpart.apply(base(), **ADAPTERS[name])
    return columns(alone), alone.gpart.layout.targets


def stacked(recompute: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = base()
    thetas = {}
    for i, (name, options) in enumerate(ADAPTERS.items()):
        gpart.apply(model, name=name, recompute=recompute, **options)
        thetas[name] = torch.randn(options["d"], generator=torch.Generator().manual_seed(10 + i))
        with torch.no_grad():
            gpart.theta(model, name).copy_(thetas[name])
    return model, thetas


def expected_weights(active, thetas) -> dict[str, torch.Tensor]:
    """Each tensor of the base model plus the sum of the active adapters' deltas (float64)."""
    out = {n: p.detach().double().clone() for n, p in base().named_parameters()}
    for name in active:
        p, targets = oracle(name)
        flat = p @ thetas[name].double()
        for t in targets:
            out[t.name] += flat[t.offset : t.offset + t.numel].view(t.shape)
    return out


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])
        for n in expected_weights([], {})
    }


@pytest.mark.parametrize("recompute", [True, False])
def test_weights_are_the_sum_of_the_active_deltas_for_every_active_set(recompute):
    model, thetas = stacked(recompute)
    assert gpart.adapters(model) == {"default": False, "b": False, "c": True}  # the newest is active
    for k in range(len(ADAPTERS) + 1):
        for active in itertools.combinations(ADAPTERS, k):
            gpart.set_active(model, list(active))
            assert [n for n, on in gpart.adapters(model).items() if on] == list(active)
            want = expected_weights(active, thetas)
            for name, w in weights(model).items():
                torch.testing.assert_close(w.double(), want[name], rtol=0, atol=1e-6, msg=f"{active} {name}")


@pytest.mark.parametrize("recompute", [True, False])
def test_every_active_theta_gets_its_own_gradient_through_the_layers(recompute):
    model, thetas = stacked(recompute)
    gpart.set_active(model, list(ADAPTERS))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    model(x).square().sum().backward()
    # The oracle: the same weights as plain float64 tensors, their gradient projected by each P_a^T.
    plain = base().double()
    with torch.no_grad():
        for n, w in expected_weights(list(ADAPTERS), thetas).items():
            plain.get_parameter(n).copy_(w)
    plain(x.double()).square().sum().backward()
    for name in ADAPTERS:
        p, targets = oracle(name)
        grad = torch.cat([plain.get_parameter(t.name).grad.reshape(-1) for t in targets])
        torch.testing.assert_close(gpart.theta(model, name).grad.double(), p.T @ grad, rtol=1e-5, atol=1e-5)


def test_switching_registers_nothing_and_moves_requires_grad():
    model, _ = stacked()
    plists = {n: list(model[0].parametrizations.weight) for n in ("w",)}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    gpart.set_active(model, ["default", "b"])
    assert [gpart.theta(model, n).requires_grad for n in ADAPTERS] == [True, True, False]
    gpart.set_active(model, [])
    assert not any(gpart.theta(model, n).requires_grad for n in ADAPTERS)
    torch.testing.assert_close(model[0].weight, model[0].parametrizations.weight.original, rtol=0, atol=0)
    gpart.set_active(model, "b")
    assert list(model[0].parametrizations.weight) == plists["w"]
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    with gpart.disabled(model):  # disabled switches every adapter off, then restores the set
        assert torch.equal(model[2].weight, model[2].parametrizations.weight.original)
    assert gpart.adapters(model) == {"default": False, "b": True, "c": False}


def test_each_adapter_has_its_own_attribute_and_theta():
    model, _ = stacked()
    names = [n for n, _ in model.named_parameters() if n.endswith("theta")]
    assert names == ["gpart.theta", "gpart_b.theta", "gpart_c.theta"]
    assert gpart.theta(model) is model.gpart.theta and gpart.theta(model, "b") is model.gpart_b.theta
    assert gpart.summary(model, name="b").theta == 9


@pytest.mark.parametrize("order", list(itertools.permutations(ADAPTERS)))
def test_removing_in_any_order_restores_the_model_exactly(order):
    plain = base()
    before = snapshot(plain)
    model = plain
    for name, options in ADAPTERS.items():
        gpart.apply(model, name=name, **options)
    for i, name in enumerate(order):
        gpart.remove(model, name=name)
        left = [n for n in ADAPTERS if n not in order[: i + 1]]
        assert list(gpart.adapters(model)) == left
        if left:  # the others still compute their own deltas
            gpart.set_active(model, left)
            thetas = {n: gpart.theta(model, n).detach() for n in ADAPTERS if n in left}
            want = expected_weights(left, thetas)
            for n, w in weights(model).items():
                torch.testing.assert_close(w.double(), want[n], rtol=0, atol=1e-6)
    assert_unchanged(model, before)


def test_merge_one_adapter_keeps_the_others_and_the_function():
    model, _ = stacked()
    gpart.set_active(model, list(ADAPTERS))
    x = torch.randn(4, 6)
    y = model(x)
    ids = {n: id(p) for n, p in model.named_parameters()}
    gpart.merge(model, name="b")
    assert list(gpart.adapters(model)) == ["default", "c"]
    torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)  # float sums in another order
    assert id(model[4].weight) == ids["4.parametrizations.weight.original"]  # b alone adapted it
    assert id(model[2].parametrizations.weight.original) == ids["2.parametrizations.weight.original"]
    gpart.merge(model, name="c")
    gpart.merge(model)
    assert gpart.adapters(model) == {} and not any(p.requires_grad is False for p in model.parameters())
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_save_and_load_per_name(tmp_path):
    model, _ = stacked()
    for name in ADAPTERS:
        gpart.save(model, tmp_path / f"{name}.safetensors", name=name)
    assert gpart.read(tmp_path / "b.safetensors")[0].keys() == {"theta"}  # no other adapter's theta
    fresh = base()
    for name in reversed(list(ADAPTERS)):  # another order, under other names
        gpart.load(fresh, tmp_path / f"{name}.safetensors", name=f"x{name}")
    gpart.set_active(model, list(ADAPTERS))
    gpart.set_active(fresh, [f"x{n}" for n in ADAPTERS])
    for n, w in weights(model).items():
        torch.testing.assert_close(weights(fresh)[n], w, rtol=1e-6, atol=1e-6)


def test_a_layout_matching_load_is_an_in_place_copy(tmp_path):
    model, _ = stacked()
    other = gpart.apply(base(), name="b", init_bound=1.0, **ADAPTERS["b"])
    path = gpart.save(other, tmp_path / "b.safetensors", name="b")
    theta = gpart.theta(model, "b")
    plist = list(model[2].parametrizations.weight)
    gpart.load(model, path, name="b")
    assert gpart.theta(model, "b") is theta and torch.equal(theta, gpart.theta(other, "b"))
    assert list(model[2].parametrizations.weight) == plist
    assert gpart.adapters(model) == {"default": False, "b": False, "c": True}  # the active set stays


@pytest.mark.parametrize(("d", "seed"), [(9, 5), (7, 2), (11, 8)])
def test_a_file_with_another_seed_or_d_swaps_in_place(tmp_path, d, seed):
    model, _ = stacked()
    source = gpart.apply(base(), name="b", init_bound=1.0, **{**ADAPTERS["b"], "d": d, "seed": seed})
    path = gpart.save(source, tmp_path / "b.safetensors", name="b")
    plist = list(model[2].parametrizations.weight)
    theta = gpart.theta(model, "b")
    gpart.load(model, path, name="b")
    assert list(model[2].parametrizations.weight) == plist
    assert (gpart.theta(model, "b") is theta) == (d == ADAPTERS["b"]["d"])  # a new length: a new theta
    assert (model.gpart_b.config.d, model.gpart_b.config.seed) == (d, seed)
    gpart.set_active(model, ["b"])
    for n, w in weights(model).items():  # exactly the source's weights
        torch.testing.assert_close(w, weights(source)[n], rtol=0, atol=0)
    path2 = gpart.save(model, tmp_path / "again.safetensors", name="b")
    assert gpart.read(path2)[1]["seed"] == str(seed)


def test_deepcopy_of_a_multi_adapter_model_is_independent():
    model, _ = stacked()
    twin = copy.deepcopy(model)
    gpart.remove(twin, name="default")
    gpart.merge(twin, name="b")
    gpart.set_active(model, list(ADAPTERS))
    assert list(gpart.adapters(model)) == list(ADAPTERS)
    model(torch.randn(2, 6)).sum().backward()


# ------------------------------------------------------------------------------------ bad input


def _unchanged(model, call, exc, *fragments):
    before = snapshot(model)
    active = gpart.adapters(model)
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, GPartError) or exc is torch.OutOfMemoryError
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert_unchanged(model, before)
    assert gpart.adapters(model) == active


@pytest.mark.parametrize("name", [1, None, "", "a-b", "1a", "x" * 65, "a b", b"a"])
def test_bad_names_are_refused(name):
    model, _ = stacked()
    for call in (
        lambda: gpart.apply(model, d=3, seed=0, name=name),
        lambda: gpart.theta(model, name),
        lambda: gpart.remove(model, name=name),
        lambda: gpart.merge(model, name=name),
        lambda: gpart.save(model, "x.safetensors", name=name),
        lambda: gpart.load(model, "x.safetensors", name=name),
    ):
        _unchanged(model, call, ConfigError, "identifier", "task_a")


def test_wrong_adapter_names_and_active_sets_are_refused():
    model, _ = stacked()
    _unchanged(model, lambda: gpart.apply(model, d=3, seed=0, name="b"), StateError, "'b'", "name=")
    _unchanged(model, lambda: gpart.remove(model, name="zz"), StateError, "'zz'", "['default', 'b', 'c']")
    _unchanged(model, lambda: gpart.merge(model, name="zz"), StateError, "'zz'")
    _unchanged(model, lambda: gpart.set_active(model, ["b", "zz"]), StateError, "['zz']", "[] for none")
    _unchanged(model, lambda: gpart.set_active(model, 3), ConfigError, "names=3", "[] for none")
    _unchanged(model, lambda: gpart.set_active(model, [""]), ConfigError, "non-empty")
    model.gpart_d = nn.Linear(1, 1)  # where an adapter named "d" would live
    _unchanged(model, lambda: gpart.apply(model, d=3, seed=0, name="d"), StateError, "'gpart_d'", "Rename")
    with pytest.raises(ConfigError):
        gpart.adapters("not a model")


def test_a_load_that_does_not_fit_an_existing_adapter_leaves_everything(tmp_path):
    model, _ = stacked()
    wrong_targets = gpart.save(gpart.apply(base(), d=9, seed=2, targets=["2"]), tmp_path / "t.safetensors")
    _unchanged(model, lambda: gpart.load(model, wrong_targets, name="b"), LayoutError, "target")
    stored = gpart.save(gpart.apply(base(), **ADAPTERS["c"]), tmp_path / "c.safetensors")
    reseeded = gpart.apply(base(), **{**ADAPTERS["c"], "seed": 9})
    _unchanged(
        model,
        lambda: gpart.load(model, gpart.save(reseeded, tmp_path / "c9.safetensors"), name="c"),
        LayoutError,
        "assignment='generator'",
        "Remove the adapter",
    )
    gpart.load(model, stored, name="c")  # the same layout loads
    no_bias = gpart.save(gpart.apply(base(), d=9, seed=2, targets=["2", "4"]), tmp_path / "n.safetensors")
    _unchanged(model, lambda: gpart.load(model, no_bias, name="b"), LayoutError, "bias: file 'none'")


def test_a_file_cannot_write_another_adapters_theta(tmp_path):
    model, _ = stacked()
    path = gpart.save(gpart.apply(base(), name="b", **ADAPTERS["b"]), tmp_path / "b.safetensors", name="b")
    tensors, metadata = gpart.read(path)
    config = json.loads(metadata["config"])
    config["trainable"] = ["gpart_c"]
    save_file(
        {**tensors, "trainable.gpart_c.theta": torch.ones(4)},
        str(path),
        {**metadata, "config": json.dumps(config)},
    )
    _unchanged(model, lambda: gpart.load(model, path, name="b"), LayoutError, "gpart's own state")


def test_a_failure_inside_merge_or_remove_of_one_adapter_changes_nothing(monkeypatch):
    from gpart.parametrization import GPartParametrization

    model, _ = stacked()
    calls = {"n": 0}
    real = GPartParametrization.effective

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("injected")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GPartParametrization, "effective", failing)
    _unchanged(model, lambda: gpart.merge(model, name="b"), torch.OutOfMemoryError)


# ------------------------------------------------------------------------------------ hot swap
needs_compiler = pytest.mark.skipif(
    not _delta.compiled_available(), reason="torch.compile cannot build kernels here"
)


def _files(tmp_path, settings: list[dict]) -> list:
    """Adapter files for ``base()`` with the given apply options and random theta."""
    paths = []
    for i, options in enumerate(settings):
        source = gpart.apply(base(), targets=["0", "2", "4"], init_bound=1.0, **options)
        paths.append(gpart.save(source, tmp_path / f"{i}.safetensors"))
    return paths


def _eager_outputs(path, x):
    return gpart.load(base(), path)(x)


def _swaps_without_recompiling(model, run, paths, x):
    """Load each file into ``model`` and train a step through ``run``; any recompilation raises."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        for path in paths:
            gpart.load(model, path)
            y = run(x)
            y.sum().backward()
            torch.testing.assert_close(y, _eager_outputs(path, x), rtol=1e-6, atol=1e-6)
            assert gpart.theta(model).grad.shape == gpart.theta(model).shape


@needs_compiler
def test_hot_swap_under_torch_compile_does_not_recompile(tmp_path):
    """Whole-model torch.compile: another theta, and another seed with the same d, load in place."""
    model = gpart.apply(base(), d=12, seed=0, targets=["0", "2", "4"])
    compiled = torch.compile(model)
    x = torch.randn(3, 6)
    compiled(x).sum().backward()
    paths = _files(tmp_path, [{"d": 12, "seed": 0}, {"d": 12, "seed": 7}, {"d": 12, "seed": -3}])
    _swaps_without_recompiling(model, compiled, paths, x)
    # Another d changes theta's length: one recompilation, then the right outputs.
    (tmp_path / "d").mkdir()
    other_d = _files(tmp_path / "d", [{"d": 9, "seed": 1}])[0]
    gpart.load(model, other_d)
    torch.testing.assert_close(compiled(x), _eager_outputs(other_d, x), rtol=1e-6, atol=1e-6)


@needs_compiler
def test_switching_to_an_active_set_seen_before_does_not_recompile():
    model, _ = stacked()
    compiled = torch.compile(model)
    x = torch.randn(3, 6)
    sets = (["default"], ["b", "c"], [])
    outputs = {}
    for names in sets:  # each set compiles once
        gpart.set_active(model, names)
        outputs[tuple(names)] = model(x).detach()
        compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for names in reversed(sets):
            gpart.set_active(model, names)
            torch.testing.assert_close(compiled(x), outputs[tuple(names)], rtol=1e-6, atol=1e-6)


@needs_compiler
def test_hot_swap_to_another_d_and_seed_keeps_the_compiled_kernels(tmp_path):
    """backend='compiled': seed and d are runtime scalars of the kernels, so neither recompiles."""
    model = gpart.apply(base(), d=12, seed=0, targets=["0", "2", "4"], backend="compiled")
    x = torch.randn(3, 6)
    model(x).sum().backward()
    paths = _files(tmp_path, [{"d": 10, "seed": 3}, {"d": 20, "seed": 11}])  # the same kind of modulo
    _swaps_without_recompiling(model, model, paths, x)


def test_the_multi_adapter_example_serves_each_task_with_its_adapter(capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "multi_adapter.py"
    spec = importlib.util.spec_from_file_location("multi_adapter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    acc = module.main()
    for task, other in (("a", "b"), ("b", "a")):
        assert acc[f"adapter {task} on task {task}"] > 0.9 > acc[f"adapter {other} on task {task}"]
        assert acc[f"slot serving {task}"] == acc[f"adapter {task} on task {task}"]
    assert "adapters: {'a': False, 'b': True}" in capsys.readouterr().out


def test_a_named_adapter_with_trainable_modules_keeps_its_name(tmp_path):
    model = gpart.apply(base(), d=3, seed=0, targets=["0"], trainable=["4"], name="task")
    assert gpart.adapters(model) == {"task": True} and model[4].weight.requires_grad
    fresh = gpart.load(base(), gpart.save(model, tmp_path / "t.safetensors", name="task"), name="task")
    assert gpart.adapters(fresh) == {"task": True}
