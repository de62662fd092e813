"""save/load: bit-exact round trips, loading into plain models, file layout, atomic writes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import gpart
import gpart.serialization as ser


def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def _trained(**kw) -> nn.Module:
    model = gpart.apply(_base(), **{"d": 16, "seed": -7, "trainable": ["4"], "bias": "all", **kw})
    with torch.no_grad():
        gpart.theta(model).normal_()
        model[4].weight.add_(1.0)
    return model


def test_round_trip_into_adapted_model_is_bit_exact(tmp_path):
    model = _trained(dropout=0.1)
    path = gpart.save(model, tmp_path / "a.safetensors")
    other = gpart.apply(_base(), d=16, seed=-7, trainable=["4"], bias="all", dropout=0.1)
    theta = gpart.theta(other)
    assert gpart.load(other, path) is other
    assert gpart.theta(other) is theta  # loaded in place: optimizers keep working
    assert torch.equal(theta, gpart.theta(model))
    assert torch.equal(other[4].weight, model[4].weight)
    x = torch.randn(5, 6)
    assert torch.equal(other.eval()(x), model.eval()(x))


def test_load_into_plain_model_reproduces_outputs_and_settings(tmp_path):
    model = _trained(dropout=0.25)
    path = gpart.save(model, tmp_path / "a.safetensors")
    plain = _base()
    gpart.load(plain, path)
    x = torch.randn(5, 6)
    assert torch.equal(plain.eval()(x), model.eval()(x))
    assert plain.gpart.config == model.gpart.config
    assert plain.gpart.layout == model.gpart.layout
    flags = lambda m: {n: p.requires_grad for n, p in m.named_parameters()}  # noqa: E731
    assert flags(plain) == flags(model)


def test_load_does_not_touch_the_global_rng(tmp_path):
    path = gpart.save(_trained(init_bound=0.5), tmp_path / "a.safetensors")
    plain = _base()
    torch.manual_seed(0)
    gpart.load(plain, path)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)


def test_file_layout_theta_only(tmp_path):
    model = gpart.apply(_base(), d=200, seed=1, targets=["0", "2"])
    path = gpart.save(model, tmp_path / "a.safetensors", trainable=False)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert len(raw) == 8 + header_len + 4 * 200  # 4*d bytes plus the header
    assert header_len < 1024
    assert set(header) == {"__metadata__", "theta"}
    assert header["theta"]["dtype"] == "F32" and header["theta"]["shape"] == [200]
    meta = header["__metadata__"]
    assert meta["format"] == "gpart" and meta["format_version"] == ser.FORMAT_VERSION
    assert meta["algorithm"] == "splitmix64-v1" and meta["gpart_version"] == gpart.__version__
    assert (meta["d"], meta["seed"], meta["D"]) == ("200", "1", str(6 * 12 + 12 * 12))
    assert json.loads(meta["targets"]) == [["0.weight", [12, 6]], ["2.weight", [12, 12]]]
    assert json.loads(meta["config"]) == {
        "bias": "none",
        "dropout": 0.0,
        "init_bound": 0.0,
        "isometric": True,
        "trainable": [],
    }


def test_save_includes_trainable_tensors_by_default(tmp_path):
    model = _trained()
    tensors, _ = gpart.read(gpart.save(model, tmp_path / "a.safetensors"))
    assert sorted(tensors) == ["theta", "trainable.4.bias", "trainable.4.weight"]
    tensors, _ = gpart.read(gpart.save(model, tmp_path / "b.safetensors", trainable=False))
    assert sorted(tensors) == ["theta"]


def test_huge_and_negative_seeds_survive_the_file(tmp_path):
    for seed in (-(2**70), 2**64 + 3, -1):
        model = gpart.apply(_base(), d=5, seed=seed)
        plain = _base()
        gpart.load(plain, gpart.save(model, tmp_path / "a.safetensors"))
        assert plain.gpart.config.seed == seed


def test_atomic_save_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    model = _trained()
    path = gpart.save(model, tmp_path / "a.safetensors")
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ser, "save_file", crash)
    with torch.no_grad():
        gpart.theta(model).zero_()
    with pytest.raises(KeyboardInterrupt):
        gpart.save(model, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind


def test_load_exact_names_missing_from_model(tmp_path):
    model = gpart.apply(_base(), d=5, seed=0, targets=["0", "2"])
    path = gpart.save(model, tmp_path / "a.safetensors")
    small = nn.Sequential(nn.Linear(6, 12))
    before = snapshot(small)
    with pytest.raises(gpart.LayoutError, match=r"target 1: '2.weight' is not a parameter"):
        gpart.load(small, path)
    assert_unchanged(small, before)


def test_no_pickle_in_the_package():
    source = "\n".join(p.read_text() for p in Path(gpart.__file__).parent.glob("*.py"))
    for banned in ("import pickle", "torch.load(", "torch.save("):
        assert banned not in source
