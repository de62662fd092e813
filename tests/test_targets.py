"""Target selection semantics and the canonical order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpart
from gpart.targets import resolve


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.value = nn.Linear(4, 4)
        self.key_query = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(3))
        self.experts = nn.Parameter(torch.zeros(2, 4, 4))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)

    def get_output_embeddings(self):
        return self.head


def _names(**kw) -> list[str]:
    return [t.name for t in resolve(Net(), **{"targets": None, **kw}).targets]


def test_list_is_exact_or_dotted_suffix():
    assert _names(targets=["query"]) == ["blocks.0.query.weight", "blocks.1.query.weight"]  # not key_query
    assert _names(targets=["blocks.1.query", "head"]) == ["blocks.1.query.weight", "head.weight"]
    with pytest.raises(gpart.TargetError):  # partial names never match
        _names(targets=["uery"])


def test_string_is_a_full_regex():
    assert _names(targets=r"blocks\.\d\.(query|value)") == [
        "blocks.0.query.weight",
        "blocks.0.value.weight",
        "blocks.1.query.weight",
        "blocks.1.value.weight",
    ]
    with pytest.raises(gpart.TargetError, match="match by suffix"):
        _names(targets="query")


def test_callable():
    got = _names(targets=lambda name, module: isinstance(module, nn.Linear) and name.startswith("blocks.1"))
    assert got == ["blocks.1.query.weight", "blocks.1.value.weight", "blocks.1.key_query.weight"]


def test_all_linear_skips_the_output_head_and_excluded_modules():
    got = _names(targets="all-linear", exclude=["blocks.0"])
    assert got == ["blocks.1.query.weight", "blocks.1.value.weight", "blocks.1.key_query.weight"]


def test_canonical_order_weight_bias_then_parameters():
    layout = resolve(Net(), targets=["blocks.0.query"], bias="all", target_parameters=["experts", "0.scale"])
    # A parent module comes before its children in named_modules(), so its own tensors do too.
    assert [t.name for t in layout.targets] == [
        "blocks.0.scale",
        "blocks.0.experts",
        "blocks.0.query.weight",
        "blocks.0.query.bias",
        "blocks.1.experts",
    ]
    offsets = [t.offset for t in layout.targets]
    assert offsets == [0, 3, 35, 51, 55] and layout.size == 87


def test_only_tensors_named_bias_escape_dropout():
    model = gpart.apply(Net(), d=10, seed=0, targets=["query"], bias="all", target_parameters=["experts"])
    plist = model.blocks[0].query.parametrizations
    assert plist.weight[0].droppable and not plist.bias[0].droppable
    assert model.blocks[0].parametrizations.experts[0].droppable
