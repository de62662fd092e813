"""Every bad input gets a GPartError naming value, rule and fix, and leaves the model as it was."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unchanged, snapshot
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

import gpart
from gpart import ConfigError, FormatError, GPartError, LayoutError, StateError, TargetError


def _fails(model, exc, *fragments, call=None, **kwargs):
    """Run apply (or ``call``), check the error type and message, and that nothing changed."""
    before = snapshot(model)
    call = call or (lambda: gpart.apply(model, **{"d": 4, "seed": 0, **kwargs}))
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, GPartError)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert_unchanged(model, before)
    return info.value


@pytest.mark.parametrize("d", [0, -1, True, 2.0, "3", None])
def test_d_must_be_positive_int(mlp, d):
    _fails(mlp, ConfigError, f"d={d!r}", "positive int", d=d)


def test_d_cannot_exceed_target_count(mlp):
    _fails(mlp, ConfigError, "d=73 exceeds D=72", "d <= 72", targets=["0"], d=73)


@pytest.mark.parametrize("seed", [1.5, "1", None, True])
def test_seed_must_be_int(mlp, seed):
    _fails(mlp, ConfigError, f"seed={seed!r}", "must be an int", seed=seed)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, math.nan, True, "0.1"])
def test_dropout_range(mlp, dropout):
    _fails(mlp, ConfigError, "dropout=", "[0, 1)", dropout=dropout)


@pytest.mark.parametrize("bias", ["some", "lora_only", None])
def test_unknown_bias_mode(mlp, bias):
    _fails(mlp, ConfigError, f"bias={bias!r}", "'none'", "'all'", bias=bias)


@pytest.mark.parametrize("value", [-1.0, math.inf, "x"])
def test_init_bound(mlp, value):
    _fails(mlp, ConfigError, "init_bound=", init_bound=value)


def test_no_target_matched_lists_nearby_names():
    model = nn.Module()
    model.encoder = nn.ModuleDict({"query": nn.Linear(4, 4), "value": nn.Linear(4, 4)})
    err = _fails(model, TargetError, "no target matched", "'query'", targets=["qurey"])
    assert "nearby module names" in str(err)
    err = _fails(model, TargetError, "use ['query'] to match by suffix", targets="query")


def test_non_floating_target():
    model = nn.Module()
    model.layer = nn.Linear(4, 4)
    model.layer.codes = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    _fails(model, TargetError, "'layer.codes'", "torch.int8", "floating-point", target_parameters=["codes"])


def test_tied_target():
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.head = nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight
    _fails(model, TargetError, "'head.weight' is shared with ['embed.weight']", "Untie", targets=["head"])


def test_shared_module_target():
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    _fails(model, TargetError, "is shared with", targets=["0"])


def test_foreign_parametrization(mlp):
    parametrize.register_parametrization(mlp[0], "weight", nn.Identity())
    _fails(mlp, TargetError, "already has a parametrization", targets=["0"])


def test_apply_twice(mlp):
    gpart.apply(mlp, d=4, seed=0)
    _fails(mlp, StateError, "already applied", "gpart.remove(model)")


def test_attribute_name_taken(mlp):
    mlp.gpart = "something of the user's"
    _fails(mlp, StateError, "already has an attribute 'gpart'")


def test_bad_trainable_and_target_types(mlp):
    _fails(mlp, TargetError, "'classifier' matches no module", trainable=["classifier"])
    _fails(mlp, ConfigError, "targets must be a list", targets=[1, 2])
    _fails(mlp, ConfigError, "trainable must be", trainable=[3])


def test_not_a_module():
    with pytest.raises(ConfigError, match=r"expected a torch\.nn\.Module"):
        gpart.apply("model", d=1, seed=0)
    with pytest.raises(ConfigError, match=r"expected a torch\.nn\.Module"):
        gpart.theta(42)


@pytest.mark.parametrize("verb", [gpart.merge, gpart.remove, gpart.theta, gpart.summary])
def test_verbs_need_an_adapter(mlp, verb):
    _fails(mlp, StateError, "has no gpart adapter", "gpart.apply", call=lambda: verb(mlp))


def test_failure_midway_rolls_back(mlp, monkeypatch):
    """An error while installing (after some targets were parametrized) undoes everything."""
    calls = []
    real = parametrize.register_parametrization

    def flaky(module, name, p, unsafe=False):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(module, name, p, unsafe=unsafe)

    monkeypatch.setattr(parametrize, "register_parametrization", flaky)
    before = snapshot(mlp)
    with pytest.raises(RuntimeError, match="boom"):
        gpart.apply(mlp, d=4, seed=0, bias="all")
    assert_unchanged(mlp, before)


# ---------------------------------------------------------------- load


@pytest.fixture
def saved(mlp, tmp_path):
    """A trained adapter file, and a fresh plain copy of the same base model."""
    fresh = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    fresh.load_state_dict(mlp.state_dict())
    gpart.apply(mlp, d=10, seed=5, trainable=["4"], init_bound=0.1)
    return gpart.save(mlp, tmp_path / "a.safetensors"), fresh


def _rewrite(path, tmp_path, *, tensors=None, metadata=None):
    t, m = gpart.read(path)
    t = tensors(t) if tensors else t
    m = {**m, **(metadata or {})}
    out = tmp_path / "bad.safetensors"
    save_file(t, str(out), metadata=m)
    return out


def test_load_missing_file(saved, tmp_path):
    _, fresh = saved
    _fails(fresh, FormatError, "no adapter file at", call=lambda: gpart.load(fresh, tmp_path / "nope"))


def test_load_not_safetensors(saved, tmp_path):
    _, fresh = saved
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 10)
    _fails(fresh, FormatError, "not a readable safetensors file", call=lambda: gpart.load(fresh, junk))


def test_load_foreign_safetensors(saved, tmp_path):
    _, fresh = saved
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    _fails(fresh, FormatError, "not a gpart adapter", call=lambda: gpart.load(fresh, other))


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        ({"tensors": lambda t: {k: v for k, v in t.items() if k != "theta"}}, "has no 'theta' tensor"),
        ({"tensors": lambda t: {**t, "extra": torch.zeros(1)}}, "unexpected tensors ['extra']"),
        ({"tensors": lambda t: {**t, "theta": torch.zeros(11)}}, "shape (11,)"),
        ({"tensors": lambda t: {**t, "theta": t["theta"].double()}}, "torch.float64"),
        ({"tensors": lambda t: {**t, "theta": torch.full((10,), math.nan)}}, "10 NaN/inf"),
        ({"tensors": lambda t: {**t, "theta": torch.tensor([math.inf] + [0.0] * 9)}}, "1 NaN/inf"),
        ({"metadata": {"format_version": "9"}}, "format_version='9'"),
        ({"metadata": {"algorithm": "other-v2"}}, "'other-v2'"),
        ({"metadata": {"targets": "not json"}}, "'targets' is not valid JSON"),
    ],
)
@pytest.mark.parametrize("into", ["plain", "adapted"])
def test_load_bad_contents(saved, tmp_path, edit, fragment, into, mlp):
    path, fresh = saved
    bad = _rewrite(path, tmp_path, **edit)
    model = fresh if into == "plain" else mlp
    _fails(model, FormatError, fragment, call=lambda: gpart.load(model, bad))


def test_load_layout_mismatch_lists_every_difference(saved, tmp_path):
    path, _ = saved
    other = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 13), nn.Tanh(), nn.Linear(13, 3))
    gpart.apply(other, d=10, seed=6, trainable=["4"])
    err = _fails(
        other, LayoutError, "2 difference(s)", "seed: file 5, model 6", call=lambda: gpart.load(other, path)
    )
    assert "target 1: file ('2.weight', [12, 12]), model ('2.weight', [13, 12])" in str(err)


def test_load_into_wrong_plain_architecture(saved):
    path, _ = saved
    other = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 13), nn.Tanh(), nn.Linear(13, 3))
    _fails(
        other,
        LayoutError,
        "target 1: '2.weight' has shape [12, 12] in the file, [13, 12] here",
        call=lambda: gpart.load(other, path),
    )
    smaller = nn.Sequential(nn.Linear(6, 12))
    _fails(
        smaller,
        LayoutError,
        "target 1: '2.weight' is not a parameter",
        call=lambda: gpart.load(smaller, path),
    )
    renamed = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12))  # the head '4' is gone
    _fails(
        renamed, LayoutError, "does not fit", "'4' matches no module", call=lambda: gpart.load(renamed, path)
    )


def test_load_extras_must_fit(saved, tmp_path):
    path, fresh = saved
    bad = _rewrite(path, tmp_path, tensors=lambda t: {**t, "trainable.9.weight": torch.zeros(1)})
    _fails(fresh, LayoutError, "'9.weight' is not a parameter", call=lambda: gpart.load(fresh, bad))
    bad = _rewrite(path, tmp_path, tensors=lambda t: {**t, "trainable.4.bias": torch.zeros(4)})
    _fails(fresh, LayoutError, "'4.bias' has shape (4,)", call=lambda: gpart.load(fresh, bad))


def test_save_into_missing_folder(mlp, tmp_path):
    gpart.apply(mlp, d=4, seed=0)
    with pytest.raises(FormatError, match="does not exist"):
        gpart.save(mlp, tmp_path / "no" / "a.safetensors")
