"""The reference implementation's adapter directory: import (against its golden deltas) and export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DATA, assert_unchanged, snapshot
from safetensors.torch import load_file, save_file

import gpart

transformers = pytest.importorskip("transformers")

OFFICIAL = DATA / "official_peft_checkpoint"


def _expected() -> dict:
    return json.loads((OFFICIAL / "expected_deltas.json").read_text())


def _bert(num_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(**_expected()["config"], num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_vendored_checkpoint_matches_shared_copy():
    shared = DATA.parents[2] / "shared" / "test-vectors" / "official_peft_checkpoint"
    if not shared.is_dir():
        pytest.skip("../shared is not present")
    for name in ("adapter_config.json", "adapter_model.safetensors", "expected_deltas.json"):
        assert (shared / name).read_bytes() == (OFFICIAL / name).read_bytes()


def test_official_checkpoint_reproduces_the_reference_deltas():
    expected = _expected()
    model = _bert()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    gpart.load_peft(model, OFFICIAL)

    state = model.gpart
    stored = load_file(OFFICIAL / "adapter_model.safetensors")
    assert (state.config.d, state.config.seed, state.config.dropout) == (1000, 7, 0.1)
    assert torch.equal(gpart.theta(model).detach(), stored["base_model.gpart_theta_d"])
    assert [t.name for t in state.layout.targets] == list(expected["targets"])
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.equal(model.get_parameter(name), stored[f"base_model.model.{name}"])
        assert model.get_parameter(name).requires_grad

    gpart.merge(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == set(expected["targets"]) | {"classifier.weight", "classifier.bias"}
    for name, ref in expected["targets"].items():
        delta = (model.get_parameter(name).double() - base[name].double()).flatten()
        assert list(delta.shape) == [ref["shape"][0] * ref["shape"][1]]
        torch.testing.assert_close(
            delta[:8], torch.tensor(ref["first8"], dtype=torch.float64), atol=1e-6, rtol=0
        )
        assert delta.sum().item() == pytest.approx(ref["sum"], rel=1e-4, abs=1e-4)
        assert (delta**2).sum().item() == pytest.approx(ref["sumsq"], rel=1e-5)


def test_export_round_trip_and_official_layout(tmp_path):
    model = gpart.apply(
        _bert(), d=500, seed=-3, targets=["query", "value"], trainable=["classifier"], bias="all"
    )
    with torch.no_grad():
        gpart.theta(model).normal_()
        model.classifier.weight.add_(1.0)
    out = gpart.save_peft(model, tmp_path / "export", task_type="SEQ_CLS")

    official = json.loads((OFFICIAL / "adapter_config.json").read_text())
    written = json.loads((out / "adapter_config.json").read_text())
    assert set(official) - {"peft_version"} <= set(written)
    assert (written["d"], written["proj_seed"], written["bias"], written["task_type"]) == (
        500,
        -3,
        "all",
        "SEQ_CLS",
    )
    assert written["modules_to_save"] == ["classifier"]
    tensors = load_file(out / "adapter_model.safetensors")
    assert sorted(tensors) == [
        "base_model.gpart_theta_d",
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
    ]

    fresh = gpart.load_peft(_bert(), out)
    x = torch.randint(0, 100, (2, 12))
    assert torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)
    assert [t.name for t in fresh.gpart.layout.targets] == [t.name for t in model.gpart.layout.targets]


def test_stock_peft_module_names_are_understood(tmp_path):
    """Stock PEFT stores a saved module as ``<name>.modules_to_save.default.<param>``."""
    shutil.copy(OFFICIAL / "adapter_config.json", tmp_path)
    tensors = load_file(OFFICIAL / "adapter_model.safetensors")
    renamed = {k.replace("classifier.", "classifier.modules_to_save.default."): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "adapter_model.safetensors")
    model = gpart.load_peft(_bert(), tmp_path)
    assert torch.equal(model.classifier.weight, tensors["base_model.model.classifier.weight"])


def _edited(tmp_path, config_changes=None, tensor_changes=None):
    config = json.loads((OFFICIAL / "adapter_config.json").read_text())
    for k, v in (config_changes or {}).items():
        if v is _DROP:
            config.pop(k)
        else:
            config[k] = v
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(OFFICIAL / "adapter_model.safetensors")
    for k, v in (tensor_changes or {}).items():
        if v is _DROP:
            tensors.pop(k)
        else:
            tensors[k] = v
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    return tmp_path


_DROP = object()


@pytest.mark.parametrize(
    ("config", "tensors", "error", "fragment"),
    [
        ({"assignment_backend": "stored"}, None, gpart.FormatError, "assignment_backend='stored'"),
        ({"projection_type": "dense"}, None, gpart.FormatError, "projection_type"),
        ({"partition_scope": "layer"}, None, gpart.FormatError, "partition_scope"),
        ({"grouping_strategy": "sorted"}, None, gpart.FormatError, "grouping_strategy"),
        ({"peft_type": "LORA"}, None, gpart.FormatError, "peft_type='LORA'"),
        ({"layers_to_transform": "0"}, None, gpart.FormatError, "layers_to_transform='0' must be an int"),
        ({"target_modules": None}, None, gpart.FormatError, "target_modules=None"),
        ({"d": "1000"}, None, gpart.FormatError, "invalid setting: d='1000'"),
        ({"proj_seed": _DROP}, None, gpart.FormatError, "proj_seed"),
        ({"d": 999}, None, gpart.FormatError, "d=999"),
        ({"target_modules": ["nothing_like_this"]}, None, gpart.TargetError, "nothing_like_this"),
        ({"bias": "foo"}, None, gpart.FormatError, "bias='foo'"),
        (None, {"base_model.gpart_theta_d": _DROP}, gpart.FormatError, "gpart_theta_d"),
        (None, {"something.else": torch.zeros(1)}, gpart.FormatError, "something.else"),
        (None, {"base_model.model.classifier.weight": torch.zeros(3, 64)}, gpart.LayoutError, "(3, 64)"),
        (None, {"base_model.model.pooler.extra": torch.zeros(3)}, gpart.LayoutError, "pooler.extra"),
    ],
)
def test_unsupported_or_broken_directories_are_refused_cleanly(tmp_path, config, tensors, error, fragment):
    directory = _edited(tmp_path, config, tensors)
    model = _bert()
    before = snapshot(model)
    with pytest.raises(error) as info:
        gpart.load_peft(model, directory)
    assert fragment in str(info.value)
    assert_unchanged(model, before)


def test_missing_files_and_adapted_models_are_refused(tmp_path):
    with pytest.raises(gpart.FormatError, match=r"adapter_config\.json"):
        gpart.load_peft(_bert(), tmp_path)
    shutil.copy(OFFICIAL / "adapter_config.json", tmp_path)
    with pytest.raises(gpart.FormatError, match=r"adapter_model\.safetensors"):
        gpart.load_peft(_bert(), tmp_path)
    adapted = gpart.apply(_bert(), d=10, seed=0, targets=["query"])
    with pytest.raises(gpart.StateError, match="already has a gpart adapter"):
        gpart.load_peft(adapted, OFFICIAL)


def test_export_refuses_what_the_reference_cannot_represent(tmp_path):
    model = gpart.apply(_bert(), d=100, seed=0, targets=["word_embeddings"])
    with pytest.raises(gpart.FormatError, match=r"word_embeddings\.weight"):
        gpart.save_peft(model, tmp_path)
    assert not list(tmp_path.iterdir())
