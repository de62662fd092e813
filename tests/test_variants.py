"""The reference's variants (``official_variants``): each case's folder through ``load_peft``, then
``merge``, and the same variant through gpart's own options, against the deltas the reference
produced."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import DATA, assert_unchanged, snapshot
from torch import nn

import gpart

VARIANTS = DATA / "official_variants"
EXPECTED = json.loads((VARIANTS / "expected.json").read_text())
CASES = {case["name"]: case for case in EXPECTED["cases"]}
#: Every case: gpart implements every variant of the reference.
SUPPORTED = {
    "bias_gpart_only",
    "block_scope",
    "block_scope_bias_all",
    "block_scope_materialized",
    "materialized",
    "materialized_bias_all",
    "signed_magnitude",
    "signed_magnitude_not_isometric",
    "layers_to_transform",
    "fastfood",
    "fastfood_anisotropic",
    "fastfood_bias_all",
    "conv1d_fan_in_fan_out",
    "conv1d_fan_in_fan_out_bias_all",
}


class _Block(nn.Module):
    def __init__(self, out_f: int, in_f: int) -> None:
        super().__init__()
        self.query, self.value, self.other = (nn.Linear(in_f, out_f) for _ in range(3))


def _formula(model: nn.Module) -> nn.Module:
    """Pretrained weights by formula: tensor k of named_parameters gets float32(0.5 cos(0.7 j + k))."""
    with torch.no_grad():
        for k, (_, p) in enumerate(model.named_parameters()):
            j = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_((0.5 * torch.cos(0.7 * j + k)).to(torch.float32).view(p.shape))
    return model


def _model(kind: str) -> nn.Module:
    if kind == "net":
        root = nn.Module()
        root.encoder = nn.Module()
        root.encoder.layers = nn.ModuleList(_Block(o, i) for o, i in EXPECTED["net_shapes"])
        return _formula(root)
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class GptBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn, self.c_proj = Conv1D(24, 8), Conv1D(8, 8)

    assert transformers is not None
    root = nn.Module()
    root.h = nn.ModuleList(GptBlock() for _ in range(2))
    return _formula(root)


def test_vendored_variants_match_the_shared_copy():
    shared = DATA.parents[2] / "shared" / "test-vectors" / "official_variants"
    if not shared.is_dir():
        pytest.skip("../shared is not present")
    for path in sorted(shared.rglob("*")):
        if path.is_file():
            assert (VARIANTS / path.relative_to(shared)).read_bytes() == path.read_bytes(), path


def test_every_case_is_classified():
    assert set(CASES) == SUPPORTED


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_supported_case_reproduces_the_reference(name, tmp_path):
    case = CASES[name]
    model = _model(case["model"])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    gpart.load_peft(model, VARIANTS / name)
    theta = torch.sin(0.37 * torch.arange(case["d"], dtype=torch.float64) + 0.1).to(torch.float32)
    assert torch.equal(gpart.theta(model).detach(), theta)
    exported = gpart.save_peft(model, tmp_path / "exported")
    gpart.merge(model)
    _check_deltas(model, base, case)

    again = _model(case["model"])  # the exported folder reloads to the same model
    gpart.merge(gpart.load_peft(again, exported))
    for n, p in again.named_parameters():
        assert torch.equal(p, model.get_parameter(n)), n


def _check_deltas(model: nn.Module, base: dict, case: dict) -> None:
    deltas = {d["name"]: d for d in case["deltas"]}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == set(deltas)
    for tensor_name, ref in deltas.items():
        delta = (model.get_parameter(tensor_name).double() - base[tensor_name].double()).flatten()
        expected = torch.tensor(ref["first8"], dtype=torch.float64)
        torch.testing.assert_close(delta[: len(expected)], expected, atol=1e-6, rtol=1e-5)
        assert math.isclose(float(delta.square().sum()), ref["sumsq"], rel_tol=1e-5)


@pytest.mark.parametrize(
    "name",
    [
        "block_scope",
        "block_scope_bias_all",
        "bias_gpart_only",
        "block_scope_materialized",
        "materialized",
        "materialized_bias_all",
        "signed_magnitude",
        "signed_magnitude_not_isometric",
        "fastfood",
        "fastfood_anisotropic",
        "fastfood_bias_all",
    ],
)
def test_variant_through_gpart_api(name):
    """The same case with gpart's own options (not the folder): apply, set theta, merge."""
    case = CASES[name]
    options = case["options"]
    model = _model(case["model"])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    gpart.apply(
        model,
        d=case["d"],
        seed=case["seed"],
        targets=case["targets"],
        bias="all" if options.get("bias", "none") != "none" else "none",
        scope="block" if options.get("partition_scope") == "transformer_block" else "global",
        isometric=options.get("isometric", True),
        assignment="signed_magnitude"
        if options.get("grouping_strategy") == "signed_magnitude"
        else "generator"
        if options.get("assignment_backend") == "materialized"
        else "hash",
        projection=options.get("projection_type", "partition"),
    )
    with torch.no_grad():
        gpart.theta(model).copy_(torch.sin(0.37 * torch.arange(case["d"], dtype=torch.float64) + 0.1))
    gpart.merge(model)
    _check_deltas(model, base, case)


def test_layer_filter_follows_peft():
    from gpart.peft_format import _LayerFilter

    keep = _LayerFilter(["q"], (2,), ())
    assert keep("model.layers.1.sub.layers.2.q", None)  # the last .name.N. wins
    assert not keep("model.layers.2.sub.layers.1.q", None)
    assert not keep("layers.2.q", None)  # a container must follow a dot
    assert keep("q", None)  # an exact name ignores the filter
    named = _LayerFilter(["q"], (0,), ("blocks", "layers"))
    assert named("x.layers.0.q", None) and not named("x.h.0.q", None)


@pytest.mark.parametrize(
    "name", sorted(SUPPORTED - {"conv1d_fan_in_fan_out", "conv1d_fan_in_fan_out_bias_all"})
)
def test_convert_round_trips_every_variant(name, tmp_path):
    """Reference folder -> gpart file -> reference folder: each step loads to the same model."""
    from gpart.peft_format import from_gpart_file, to_gpart_file

    case = CASES[name]
    expected = gpart.merge(gpart.load_peft(_model(case["model"]), VARIANTS / name))
    path = to_gpart_file(VARIANTS / name, _model(case["model"]), tmp_path / "a.safetensors")
    folder = from_gpart_file(path, tmp_path / "ref")
    for loaded in (gpart.load(_model(case["model"]), path), gpart.load_peft(_model(case["model"]), folder)):
        gpart.merge(loaded)
        for n, p in loaded.named_parameters():
            assert torch.equal(p, expected.get_parameter(n)), n


@pytest.mark.parametrize("pattern", ["layers", ["layers", "stages"]])
def test_block_scope_folder_with_layers_pattern(pattern, tmp_path):
    """With partition_scope='transformer_block', layers_pattern names the block containers."""
    case = CASES["block_scope"]
    folder = tmp_path / "folder"
    shutil.copytree(VARIANTS / "block_scope", folder)
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**settings, "layers_pattern": pattern}))
    model = _model(case["model"])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    gpart.load_peft(model, folder)
    assert model.gpart.config.block_containers == ((pattern,) if isinstance(pattern, str) else tuple(pattern))
    exported = gpart.save_peft(model, tmp_path / "exported")
    assert json.loads((exported / "adapter_config.json").read_text())["layers_pattern"] == list(
        model.gpart.config.block_containers
    )
    gpart.merge(model)
    _check_deltas(model, base, case)  # "layers" is among the default containers: the same blocks
    (folder / "adapter_config.json").write_text(json.dumps({**settings, "layers_pattern": "h"}))
    plain = _model(case["model"])
    before = snapshot(plain)
    with pytest.raises(gpart.TargetError, match=r"not inside a numbered transformer block .*\['h'\]"):
        gpart.load_peft(plain, folder)
    assert_unchanged(plain, before)
