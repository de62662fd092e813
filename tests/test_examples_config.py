"""The runners' config system: one test per precedence level, conversions, clear errors."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from common import cli
from common import config as C

PRESETS = C.Presets(
    adapter={"gpart": {"training.lr": 5e-3, "training.epochs": 7}, "lora": {"training.lr": 4e-4}},
    task={"cola": {"training.epochs": 80, "training.head_lr": 2e-3, "task.metric": "matthews"}, "rte": {}},
    size={
        "base": {"model_name": "roberta-base"},
        "large": {"model_name": "roberta-large", "training.batch_size": 16},
    },
    size_task={("large", "cola"): {"training.epochs": 60}},
)


def test_level_1_dataclass_defaults():
    cfg = C.resolve(C.Presets(task={"rte": {}}), adapter_type="gpart", task="rte")
    assert (cfg.training.lr, cfg.training.epochs, cfg.adapter.d, cfg.adapter.isometric) == (
        1e-3,
        10,
        23_040,
        True,
    )
    assert cfg.sources == {}


def test_level_2_adapter_preset_beats_defaults():
    cfg = C.resolve(PRESETS, adapter_type="gpart", task="rte")
    assert cfg.training.lr == 5e-3 and cfg.training.epochs == 7
    assert cfg.sources["training.lr"] == "adapter preset"
    assert C.resolve(PRESETS, adapter_type="lora", task="rte").training.lr == 4e-4


def test_level_3_task_overrides_beat_the_adapter_preset():
    cfg = C.resolve(PRESETS, adapter_type="gpart", task="cola")
    assert cfg.training.epochs == 80 and cfg.training.lr == 5e-3 and cfg.task.metric == "matthews"
    assert cfg.sources["training.epochs"] == "task overrides"


def test_level_4_model_size_preset_beats_task_overrides():
    cfg = C.resolve(PRESETS, adapter_type="gpart", task="cola", model_size="large")
    assert (cfg.model_name, cfg.training.batch_size, cfg.training.epochs) == ("roberta-large", 16, 60)
    assert cfg.training.head_lr == 2e-3  # the task's value survives where the size preset is silent
    assert cfg.sources["training.epochs"] == "model-size preset"


def test_level_5_command_line_beats_everything_with_typed_conversion():
    overrides = [
        "training.epochs",
        "3",
        "adapter.d",
        "16384",
        "training.lr",
        "0.001",
        "adapter.isometric",
        "False",
    ]
    overrides += ["adapter.targets", "q_proj,v_proj", "training.max_grad_norm", "1.0", "model_name", "x/y"]
    cfg = C.resolve(PRESETS, adapter_type="gpart", task="cola", model_size="large", overrides=overrides)
    assert (cfg.training.epochs, cfg.adapter.d, cfg.training.lr, cfg.adapter.isometric) == (
        3,
        16384,
        0.001,
        False,
    )
    assert cfg.adapter.targets == ["q_proj", "v_proj"] and cfg.training.max_grad_norm == 1.0
    assert cfg.model_name == "x/y" and cfg.sources["adapter.isometric"] == "command line"
    cfg = C.resolve(PRESETS, adapter_type="gpart", task="rte", overrides=["adapter.seed", "None"])
    assert cfg.adapter.seed is None


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["adapter.dd", "5"], "did you mean ['adapter.d'"),
        (["adapter.r", "8"], "unknown config key 'adapter.r' for adapter type 'gpart'"),
        (["training", "5"], "unknown config key 'training'"),
        (["adapter.d", "abc"], "adapter.d = 'abc': expected int"),
        (["adapter.isometric", "maybe"], "use True or False"),
        (["training.lr"], "pairs"),
    ],
)
def test_bad_command_line_keys_and_values_are_explained(overrides, fragment):
    with pytest.raises(C.OverrideError) as info:
        C.resolve(PRESETS, adapter_type="gpart", task="rte", overrides=overrides)
    assert fragment in str(info.value)


def test_bad_presets_and_choices_are_explained():
    with pytest.raises(C.OverrideError, match="expected int"):
        C.resolve(C.Presets(task={"t": {"training.epochs": "3"}}), adapter_type="gpart", task="t")
    with pytest.raises(C.OverrideError, match="choose one of"):
        C.resolve(PRESETS, adapter_type="prompt", task="rte")
    with pytest.raises(C.OverrideError, match="choose one of"):
        C.resolve(PRESETS, adapter_type="gpart", task="mnli")


def test_a_new_adapter_is_one_class_and_one_registration():
    @dataclass
    class VeRAAdapter(C.AdapterConfig):
        kind: ClassVar[str] = "myvera"
        r: int = 256

    try:
        C.register_adapter(VeRAAdapter)
        argv = ["--adapter_type", "myvera", "--tasks", "rte", "adapter.r", "1024"]
        _, (cfg,) = cli.configs(argv, doc="", presets=PRESETS, spec=cli.Spec(), output_dir="runs")
        assert isinstance(cfg.adapter, VeRAAdapter) and cfg.adapter.r == 1024
        with pytest.raises(ValueError, match="already registered"):
            C.register_adapter(VeRAAdapter)
    finally:
        C.ADAPTERS.pop("myvera", None)


def test_resolved_config_is_saved_with_its_sources(tmp_path):
    cfg = C.resolve(PRESETS, adapter_type="gpart", task="cola", overrides=["adapter.d", "100"])
    saved = json.loads(C.save_config(cfg, tmp_path / "run" / "config.json").read_text())
    assert saved["adapter_type"] == "gpart" and saved["adapter"]["d"] == 100
    assert saved["sources"]["adapter.d"] == "command line" and saved["training"]["epochs"] == 80
