"""The ViT runner end to end on a tiny ViT and generated images, DTD from a local folder included."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "vision"))
import finetune_ViT as vit  # noqa: E402


def _images(n: int, classes: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Class k = a bright patch in a different place: learnable by a tiny ViT."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % classes
        img = (torch.rand(3, 12, 12, generator=g) * 60).to(torch.uint8)
        img[:, 2 * label : 2 * label + 4, 2:6] = 250
        out.append((img, label))
    return out


def toy_data(task: str, cfg):
    classes = cfg.task.num_labels
    data = {"train": _images(40, classes, 0), "test": _images(12, classes, 1)}
    if task == "dtd":
        return vit.dtd_from_folder(Path(cfg.task.data_root))
    return data  # no validation split: the runner holds out 10% of train


def tiny_vit(cfg):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=cfg.task.num_labels,
    )
    return transformers.ViTForImageClassification(config)


TINY = vit.Loaders(data=toy_data, model=tiny_vit)
FAST = ["training.epochs", "2", "training.batch_size", "8", "training.grad_accum", "2", "adapter.d", "64"]


def _dtd_folder(root: Path) -> Path:
    from PIL import Image

    for cls in ("banded", "dotted"):
        (root / "images" / cls).mkdir(parents=True)
    lines = {"train": [], "val": [], "test": []}
    for i in range(12):
        cls = ("banded", "dotted")[i % 2]
        name = f"{cls}/{cls}_{i:04d}.jpg"
        Image.new("RGB", (20, 20), (250 if cls == "banded" else 10, 120, 40)).save(root / "images" / name)
        lines[("train", "train", "val", "test")[i % 4]].append(name)
    (root / "labels").mkdir()
    for part, names in lines.items():
        (root / "labels" / f"{part}1.txt").write_text("\n".join(names) + "\n")
    return root


def test_vit_runs_end_to_end_with_a_held_out_split_and_local_dtd(tmp_path):
    out = tmp_path / "vit"
    dtd = _dtd_folder(tmp_path / "dtd")
    results = vit.main(
        [
            "--tasks",
            "cifar10,dtd",
            "--seeds",
            "0",
            "--output_dir",
            str(out),
            *FAST,
            "task.data_root",
            str(dtd),
            "task.num_labels",
            "2",
        ],
        loaders=TINY,
    )
    assert [r["task"] for r in results] == ["cifar10", "dtd"]
    folder = out / "cifar10" / "gpart-base" / "seed0"
    config = json.loads((folder / "config.json").read_text())
    # the recipe's defaults; the size's batch overridden on the command line
    assert config["training"]["warmup_ratio"] == 0.4 and config["training"]["weight_decay"] == 0.01
    assert config["sources"]["training.warmup_ratio"] == "runner defaults"
    assert config["training"]["batch_size"] == 8 and config["adapter"]["d"] == 64
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
    assert 0.0 <= results[0]["test_metric"] <= 1.0 and results[0]["params"]["adapter"] == 64
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "vit_collect", Path(vit.__file__).parent / "collect_results_ViT.py"
    )
    collector = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collector)
    assert "| gpart (base) |" in collector.main([str(out)])

    sys.path.insert(0, str(Path(vit.__file__).parent))
    import eval_ViT

    argv = [
        "--adapter_path",
        str(folder),
        "--dataset",
        "cifar10",
        "training.batch_size",
        "8",
        "task.num_labels",
        "2",
    ]
    (evaluated,) = eval_ViT.main(argv, loaders=TINY)
    assert evaluated["test_metric"] == pytest.approx(results[0]["test_metric"])


def test_vit_base_recipe_counts():
    (counts,) = vit.main(["--compute_params_only", "--tasks", "cifar100"])
    assert counts["adapter"] == 72_000 and counts["head"] == 768 * 100 + 100
    (counts,) = vit.main(["--compute_params_only", "--tasks", "cifar100", "--model_size", "large"])
    assert counts["adapter"] == 144_000


def test_pixels_from_any_image_type():
    from PIL import Image

    pil = Image.new("RGB", (10, 8), (255, 0, 0))
    arr = torch.full((8, 10, 3), 255, dtype=torch.uint8).numpy()
    chw = torch.zeros(3, 8, 10)
    pixels = vit.to_pixels([pil, arr, chw], 16)
    assert pixels.shape == (3, 3, 16, 16)
    assert torch.allclose(pixels[0, 0], torch.ones(16, 16)) and torch.allclose(
        pixels[0, 1], -torch.ones(16, 16)
    )
    assert torch.allclose(pixels[2], -torch.ones(3, 16, 16))
