"""Hostile inputs: every one raises a GPartError naming the fix, and the model is left exactly as it was.

Each test is one way a file, an argument or a failure midway used to get past gpart's promises.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import assert_unchanged, snapshot
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import gpart
from gpart import ConfigError, FormatError, GPartError, LayoutError, TargetError
from gpart.cli import main as cli


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def _adapted() -> nn.Module:
    return gpart.apply(_base(), d=10, seed=5, targets=["0", "2"], trainable=["4"], init_bound=0.1)


def _refused(model, exc, fragment, call):
    before = snapshot(model)
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, GPartError)
    assert fragment in str(info.value), str(info.value)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------- gpart files


def _gpart_file(tmp_path, *, tensors=None, metadata=None, config=None):
    """A saved adapter with some tensors, metadata fields or config settings replaced."""
    path = gpart.save(_adapted(), tmp_path / "good.safetensors")
    t, m = gpart.read(path)
    if tensors:
        t = tensors(dict(t))
    if config:
        m["config"] = json.dumps({**json.loads(m["config"]), **config})
    m.update(metadata or {})
    out = tmp_path / "edited.safetensors"
    save_file(t, str(out), metadata=m)
    return out


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"bias": "bogus"}, "bias='bogus'"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": math.inf}, "dropout=inf"),
        ({"dropout": math.nan}, "dropout=nan"),
        ({"dropout": 0.99999999999}, "dropout=0.99999999999"),
        ({"init_bound": -1.0}, "init_bound=-1.0"),
        ({"init_bound": 1e39}, "init_bound=1e+39"),
        ({"isometric": "false"}, "isometric='false'"),
        ({"trainable": [1]}, "trainable must be a list"),
        ({"trainable": "4"}, "'trainable' must be a list"),
        ({"trainable": [""]}, "empty name"),
        ({"extra": 1}, "must hold exactly"),
    ],
)
@pytest.mark.parametrize("into", ["plain", "adapted"])
def test_gpart_file_settings_are_validated_like_apply(tmp_path, config, fragment, into):
    path = _gpart_file(tmp_path, config=config)
    model = _base() if into == "plain" else _adapted()
    _refused(model, FormatError, fragment, lambda: gpart.load(model, path))


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        ({"d": "0"}, "d=0"),
        ({"d": "x"}, "d='x' is not an integer"),
        ({"D": "12"}, "D=12, but its targets hold 216"),
        ({"targets": json.dumps([["0.weight", [12, 6]], ["0.weight", [12, 12]]])}, "unique"),
        ({"targets": json.dumps([["", [12, 6]]])}, "names non-empty"),
        ({"targets": json.dumps([["0.weight", [12, True]]])}, "sizes >= 0"),
        ({"targets": '[["\\udc80", [216]]]'}, "UTF-8"),
        ({"config": "[" * 100_000 + "]" * 100_000}, "not valid JSON (RecursionError"),
        ({"targets": "[" * 100_000 + "]" * 100_000}, "not valid JSON (RecursionError"),
    ],
)
def test_gpart_file_metadata_is_validated(tmp_path, metadata, fragment):
    path = _gpart_file(tmp_path, metadata=metadata)
    model = _base()
    _refused(model, FormatError, fragment, lambda: gpart.load(model, path))


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("1.weight", "not a parameter"),  # Tanh has none
        ("0.weight", "a target's pretrained weight"),
        ("0.bias", "outside the modules the file declares trainable"),  # frozen, not declared
        ("gpart.theta", "gpart's own state"),
    ],
)
@pytest.mark.parametrize("into", ["plain", "adapted"])
def test_gpart_file_writes_only_theta_and_declared_modules(tmp_path, name, fragment, into):
    shapes = {"1.weight": (1,), "0.weight": (12, 6), "0.bias": (12,), "gpart.theta": (10,)}
    path = _gpart_file(tmp_path, tensors=lambda t: {**t, f"trainable.{name}": torch.ones(shapes[name])})
    model = _base() if into == "plain" else _adapted()
    _refused(model, LayoutError, fragment, lambda: gpart.load(model, path))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_gpart_file_non_finite_heads_are_refused(tmp_path, bad):
    def poison(t):
        t["trainable.4.bias"] = torch.tensor([0.0, bad, 0.0])
        return t

    path = _gpart_file(tmp_path, tensors=poison)
    model = _base()
    _refused(model, FormatError, "'4.bias' has 1 NaN/inf", lambda: gpart.load(model, path))


def test_save_declares_modules_made_trainable_by_hand(tmp_path):
    model = gpart.apply(_base(), d=10, seed=5, targets=["0"])
    model[4].weight.requires_grad_(True)  # not declared in apply(trainable=...)
    path = gpart.save(model, tmp_path / "a.safetensors")
    assert json.loads(gpart.read(path)[1]["config"])["trainable"] == ["4"]
    fresh = gpart.load(_base(), path)
    assert torch.equal(fresh[4].weight, model[4].weight)


def test_resuming_into_an_adapted_model_writes_trainable_tensors_only(tmp_path):
    model = gpart.apply(_base(), d=10, seed=5, targets=["0"])
    model[4].weight.requires_grad_(True)
    path = gpart.save(model, tmp_path / "a.safetensors")
    resumed = gpart.apply(_base(), d=10, seed=5, targets=["0"])
    _refused(resumed, LayoutError, "'4.weight' is frozen in this model", lambda: gpart.load(resumed, path))
    resumed[4].weight.requires_grad_(True)  # the same set-up as when it was saved
    gpart.load(resumed, path)
    assert torch.equal(resumed[4].weight, model[4].weight)


def test_save_refuses_trainable_tensors_of_target_modules(tmp_path):
    model = gpart.apply(_base(), d=10, seed=5, targets=["0"])
    model[0].bias.requires_grad_(True)  # bias of a target module: cannot be declared trainable
    with pytest.raises(gpart.StateError, match="trainable=False"):
        gpart.save(model, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


def test_load_on_a_plain_model_lists_every_missing_target(tmp_path):
    path = gpart.save(_adapted(), tmp_path / "a.safetensors")
    model = nn.Sequential(nn.Linear(6, 11))
    before = snapshot(model)
    with pytest.raises(LayoutError) as info:
        gpart.load(model, path)
    assert "2 difference(s)" in str(info.value)
    assert "target 0: '0.weight' has shape [12, 6] in the file, [11, 6] here" in str(info.value)
    assert "target 1: '2.weight' is not a parameter" in str(info.value)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------- reference folders


def _peft_folder(tmp_path, *, config=None, tensors=None):
    folder = tmp_path / "ref"
    gpart.save_peft(_adapted(), folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    if tensors:
        stored = tensors(load_file(folder / "adapter_model.safetensors"))
        save_file(stored, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"bias": "bogus"}, "bias='bogus'"),
        ({"gpart_dropout": 1.0}, "dropout=1.0"),
        ({"init_bound": 1e39}, "init_bound=1e+39"),
        ({"init_bound": -0.5}, "init_bound=-0.5"),
        ({"isometric": "false"}, "isometric='false'"),
        ({"modules_to_save": "4"}, "modules_to_save='4' must be a list"),
        ({"modules_to_save": [1]}, "modules_to_save=[1] must be a list"),
        ({"d": "0"}, "d='0'"),
        ({"d": 0}, "d=0"),
        ({"d": True}, "d=True"),
        ({"target_modules": [""]}, "target_modules=['']"),
        ({"target_modules": "["}, "not a valid regular expression"),
    ],
)
def test_reference_settings_are_validated_like_apply(tmp_path, config, fragment):
    folder = _peft_folder(tmp_path, config=config)
    model = _base()
    _refused(model, GPartError, fragment, lambda: gpart.load_peft(model, folder))


def test_reference_config_nested_deep_is_a_format_error(tmp_path):
    folder = _peft_folder(tmp_path)
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    model = _base()
    _refused(model, FormatError, "RecursionError", lambda: gpart.load_peft(model, folder))


def test_reference_tensor_named_like_a_target_is_refused(tmp_path):
    folder = _peft_folder(tmp_path, tensors=lambda t: {**t, "base_model.model.0.weight": torch.zeros(12, 6)})
    model = _base()
    _refused(
        model,
        LayoutError,
        "'0.weight' is a target's pretrained weight",
        lambda: gpart.load_peft(model, folder),
    )


def test_reference_tensor_outside_modules_to_save_is_refused(tmp_path):
    folder = _peft_folder(tmp_path, tensors=lambda t: {**t, "base_model.model.0.bias": torch.zeros(12)})
    model = _base()
    _refused(
        model,
        LayoutError,
        "outside the modules the file declares trainable",
        lambda: gpart.load_peft(model, folder),
    )


@pytest.mark.parametrize("key", ["base_model.gpart_theta_d", "base_model.model.4.weight"])
def test_reference_non_finite_tensors_are_refused(tmp_path, key):
    def poison(t):
        t[key] = t[key].clone().view(-1).index_fill(0, torch.tensor([1]), math.nan).view(t[key].shape)
        return t

    folder = _peft_folder(tmp_path, tensors=poison)
    with pytest.raises(FormatError, match="NaN/inf"):
        gpart.read_peft(folder)
    model = _base()
    _refused(model, FormatError, "NaN/inf", lambda: gpart.load_peft(model, folder))


def test_reference_init_bound_overflow_leaves_model_unchanged(tmp_path):
    folder = _peft_folder(tmp_path, config={"init_bound": 1e39})
    model = _base()
    _refused(model, FormatError, "float32", lambda: gpart.load_peft(model, folder))


# ------------------------------------------------------------------------------- arguments


def test_init_bound_that_overflows_float32_is_refused():
    model = _base()
    _refused(model, ConfigError, "init_bound=1e+39", lambda: gpart.apply(model, d=4, seed=0, init_bound=1e39))


def test_empty_trainable_name_would_match_the_root():
    model = _base()
    _refused(model, ConfigError, "empty name", lambda: gpart.apply(model, d=4, seed=0, trainable=[""]))
    _refused(model, ConfigError, "empty name", lambda: gpart.apply(model, d=4, seed=0, targets=[""]))


def test_invalid_regex_is_a_target_error(tmp_path):
    model = _base()
    _refused(
        model,
        TargetError,
        "not a valid regular expression",
        lambda: gpart.apply(model, d=4, seed=0, targets="["),
    )


def test_tie_by_storage_is_detected():
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.head = nn.Linear(4, 10, bias=False)
    model.head.weight = nn.Parameter(model.embed.weight.data)  # shares memory, not the object
    _refused(
        model,
        TargetError,
        "shared with ['embed.weight']",
        lambda: gpart.apply(model, d=4, seed=0, targets=["head"]),
    )


def test_views_of_one_storage_that_do_not_overlap_are_not_ties():
    model = nn.Module()
    storage = torch.randn(2, 8, 4)
    model.a = nn.Linear(4, 8, bias=False)
    model.b = nn.Linear(4, 8, bias=False)
    model.a.weight = nn.Parameter(storage[0])
    model.b.weight = nn.Parameter(storage[1])
    gpart.apply(model, d=4, seed=0, targets=["a"])


@pytest.mark.parametrize(
    "path, exc, fragment",
    [
        (None, ConfigError, "must be a str or os.PathLike"),
        (3, ConfigError, "must be a str or os.PathLike"),
        ("", ConfigError, "not a usable file name"),
    ],
)
def test_save_and_load_paths_of_the_wrong_type(path, exc, fragment):
    model = _adapted()
    with pytest.raises(exc, match=fragment):
        gpart.save(model, path)
    with pytest.raises(exc, match=fragment):
        gpart.load(_base(), path)


def test_save_to_a_folder_or_an_unwritable_place(tmp_path, monkeypatch):
    model = _adapted()
    with pytest.raises(FormatError, match="it is a folder"):
        gpart.save(model, tmp_path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(FormatError, match="PermissionError: Permission denied"):
        gpart.save(model, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_save_peft_onto_an_existing_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(FormatError, match="a file of that name exists"):
        gpart.save_peft(_adapted(), tmp_path / "taken")


# ------------------------------------------------------------------------------- atomic verbs


class _Boom(torch.OutOfMemoryError):
    pass


def _fail_at(monkeypatch, owner, name, k):
    """Make the k-th call of ``owner.name`` raise an out-of-memory error."""
    real = getattr(owner, name)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise _Boom("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


def _state_of(model):
    """A snapshot plus what only an adapted model has: theta, the layout, outputs."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return snapshot(model), model(x), x


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_merge_failing_at_any_target_leaves_the_model_adapted(monkeypatch, k):
    model = gpart.apply(_base(), d=10, seed=5, bias="all", targets=["0", "2"], init_bound=0.1)
    before, y, x = _state_of(model)
    _fail_at(monkeypatch, gpart.parametrization.GPartParametrization, "effective", k)
    with pytest.raises(_Boom):
        gpart.merge(model)
    monkeypatch.undo()
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), y)
    gpart.merge(model)  # and it still merges afterwards
    with torch.no_grad():
        assert torch.equal(model(x), y)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_remove_failing_at_any_target_leaves_the_model_adapted(monkeypatch, k):
    model = _base()
    plain = snapshot(model)
    gpart.apply(model, d=10, seed=5, bias="all", targets=["0", "2"], init_bound=0.1)
    before, y, x = _state_of(model)
    _fail_at(monkeypatch, parametrize, "remove_parametrizations", k)
    with pytest.raises(_Boom):
        gpart.remove(model)
    monkeypatch.undo()
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), y)
    gpart.remove(model)
    assert_unchanged(model, plain)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("verb", ["apply", "load", "load_peft"])
def test_adapting_verbs_failing_at_any_target_leave_the_model_unchanged(tmp_path, monkeypatch, k, verb):
    source = gpart.apply(_base(), d=10, seed=5, bias="all", targets=["0", "2"], trainable=["4"])
    path = gpart.save(source, tmp_path / "a.safetensors")
    folder = gpart.save_peft(source, tmp_path / "ref")
    calls = {
        "apply": lambda m: gpart.apply(m, d=10, seed=5, bias="all", targets=["0", "2"]),
        "load": lambda m: gpart.load(m, path),
        "load_peft": lambda m: gpart.load_peft(m, folder),
    }
    model = _base()
    before = snapshot(model)
    _fail_at(monkeypatch, parametrize, "register_parametrization", k)
    with pytest.raises(_Boom):
        calls[verb](model)
    assert_unchanged(model, before)


def test_out_of_memory_while_counting_groups_changes_nothing(monkeypatch):
    model = _base()
    before = snapshot(model)
    _fail_at(monkeypatch, gpart._delta, "count_groups", 1)
    with pytest.raises(_Boom):
        gpart.apply(model, d=4, seed=0)
    assert_unchanged(model, before)


def test_remove_restores_the_class_of_a_module_with_another_parametrization():
    model = _base()
    parametrizations.weight_norm(model[0])
    cls = type(model[0])
    x = torch.randn(2, 6)
    y = model(x)
    gpart.apply(model, d=4, seed=0, targets=["2"], target_parameters=["0.bias"], init_bound=0.5)
    assert not torch.equal(model(x), y)
    gpart.remove(model)
    assert type(model[0]) is cls
    assert torch.equal(model(x), y)
    assert "bias" not in vars(cls)  # the shared class never got gpart's property
    assert parametrize.is_parametrized(model[0], "weight")


# ------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        ({"D": "x"}, "D='x' is not an integer"),
        ({"d": "0"}, "d=0"),
        ({"targets": '[["\\udc80", [12, 6]], ["2.weight", [12, 12]]]'}, "UTF-8"),
    ],
)
def test_inspect_prints_one_line_on_broken_metadata(tmp_path, capsys, metadata, fragment):
    path = _gpart_file(tmp_path, metadata=metadata)
    assert cli(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpart: error:") and fragment in err


def test_inspect_without_D_prints_one_line(tmp_path, capsys):
    path = gpart.save(_adapted(), tmp_path / "a.safetensors")
    t, m = gpart.read(path)
    del m["D"]
    save_file(t, str(path), metadata=m)
    assert cli(["inspect", str(path)]) == 1
    assert "lacks gpart metadata ['D']" in capsys.readouterr().err


def test_convert_with_an_invalid_regex_is_a_target_error(tmp_path):
    from gpart.peft_format import to_gpart_file

    folder = _peft_folder(tmp_path, config={"target_modules": "["})
    with pytest.raises(TargetError, match="not a valid regular expression"):
        to_gpart_file(folder, _base(), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------------------- reentrant guard


def test_reentrant_guard_walks_the_stack_only_in_training(monkeypatch):
    calls = []
    monkeypatch.setattr(gpart.parametrization, "_check_reentrant_checkpoint", lambda: calls.append(1))
    model = _adapted()
    x = torch.randn(2, 6)
    with torch.no_grad():
        model.eval()(x)  # evaluation: never
        assert calls == []
        model.train()(x)  # training mode with grad off: what a reentrant checkpoint does
    assert len(calls) == 2  # once per target
    calls.clear()
    model.train()(x)  # grad on: never
    assert calls == []


def test_convert_of_a_reference_folder_hashes_nothing(tmp_path, monkeypatch):
    """Converting needs the layout only: no pass over the D entries (a 7B model has ~1e9)."""
    from gpart.peft_format import to_gpart_file

    folder = gpart.save_peft(_adapted(), tmp_path / "ref")

    def hashing(*args, **kwargs):
        raise AssertionError("convert hashed the index space")

    monkeypatch.setattr(gpart._delta, "count_groups", hashing)
    out = to_gpart_file(folder, _base(), tmp_path / "a.safetensors")
    monkeypatch.undo()
    fresh = gpart.load(_base(), out)
    expected = gpart.load_peft(_base(), folder)
    with torch.no_grad():
        assert torch.equal(fresh(torch.ones(1, 6)), expected(torch.ones(1, 6)))


def test_inspect_on_an_ascii_terminal_escapes_what_it_cannot_print(tmp_path):
    import subprocess
    import sys

    model = nn.Module()
    model.add_module("héad", nn.Linear(4, 4))
    path = gpart.save(gpart.apply(model, d=3, seed=0), tmp_path / "a.safetensors")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    run = subprocess.run(
        [sys.executable, "-m", "gpart", "inspect", str(path)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "h\\xe9ad.weight" in run.stdout


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[" * 100_000 + "]" * 100_000, "RecursionError"),
        ("[1, 2]", "holds list"),
        ('{"architectures": 3}', "model class None"),
        ('{"architectures": ["BertModel"], "hidden_size": -4}', "does not build a BertModel"),
    ],
)
def test_convert_with_a_hostile_model_config_is_one_line(tmp_path, capsys, text, fragment):
    pytest.importorskip("transformers")
    folder = gpart.save_peft(_adapted(), tmp_path / "ref")
    config = tmp_path / "config.json"
    config.write_text(text)
    assert (
        cli(["convert", str(folder), str(tmp_path / "out.safetensors"), "--model-config", str(config)]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("gpart: error:") and err.count("\n") == 1 and fragment in err, err
