"""The GLUE runner end to end on a tiny RoBERTa and generated data (only the loaders are swapped)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "glue"))
import collect_results_glue as collect_results  # noqa: E402
import finetune_roberta_glue as glue  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


class ToyTokenizer:
    """Whitespace words -> ids (hashing), with RoBERTa's special ids and padding."""

    def __call__(self, first, second=None, *, truncation, max_length, padding, return_tensors):
        rows = []
        for i, text in enumerate(first):
            ids = [0] + [5 + WORDS.index(w) for w in text.split()] + [2]
            if second is not None:
                ids += [2] + [5 + WORDS.index(w) for w in second[i].split()] + [2]
            rows.append(ids[:max_length])
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [1] * (width - len(r)) for r in rows])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 1).long()}


def toy_data(task: str) -> dict[str, list[dict]]:
    """Label = whether word w7 occurs (STS-B: how often, as a score); pairs for pair tasks."""
    rng = random.Random(task)
    keys, _, labels = glue.TASKS[task]

    def row():
        words = [rng.choice(WORDS) for _ in range(6)]
        r = {keys[0]: " ".join(words[:3]), "label": 0}
        r[keys[1] or "unused"] = " ".join(words[3:])
        hits = words.count("w7") + words.count("w8")
        r["label"] = float(hits) if labels == 1 else int(hits > 0)
        return r

    return {"train": [row() for _ in range(48)], "validation": [row() for _ in range(16)]}


def tiny_model(cfg):
    torch.manual_seed(0)
    config = transformers.RobertaConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=cfg.task.num_labels,
    )
    return transformers.RobertaForSequenceClassification(config), ToyTokenizer()


TINY = glue.Loaders(data=toy_data, model=tiny_model)
FAST = [
    "training.epochs",
    "2",
    "training.batch_size",
    "8",
    "training.min_val_examples",
    "8",
    "adapter.d",
    "64",
]


def test_gpart_runs_end_to_end_and_the_collector_tabulates(tmp_path, capsys):
    out = tmp_path / "glue"
    results = glue.main(
        ["--tasks", "cola,stsb", "--seeds", "0,1", "--output_dir", str(out), *FAST], loaders=TINY
    )
    assert [(r["task"], r["seed"]) for r in results] == [("cola", 0), ("cola", 1), ("stsb", 0), ("stsb", 1)]
    folder = out / "cola" / "gpart-base" / "seed1"
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["adapter"]["d"] == 64
        and config["training"]["head_lr"] == 2e-3
        and config["task"]["metric"] == "matthews"
    )
    assert config["sources"]["training.epochs"] == "command line"
    epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    final = json.loads((folder / "final.json").read_text())
    assert final["params"]["adapter"] == 64 and final["best_epoch"] in (1, 2)
    assert -1.0 <= final["test_metric"] <= 1.0
    import gpart

    assert gpart.read(folder / "adapter.safetensors")[1]["d"] == "64"
    assert "epoch 2: loss" in capsys.readouterr().out

    table = collect_results.main([str(out)])
    assert "| gpart (base) |" in table and "cola" in table and "stsb" in table and "(n=2)" in table
    assert "\\begin{tabular}" in collect_results.main([str(out), "--latex"])


@pytest.mark.parametrize("adapter", ["lora", "vera", "unilora", "condlora", "full", "head", "bitfit"])
def test_baselines_run_through_the_same_runner(tmp_path, adapter):
    overrides = [a for a in FAST if not a.startswith("adapter.") and a != "64"]
    (result,) = glue.main(
        ["--tasks", "rte", "--adapter_type", adapter, "--output_dir", str(tmp_path), *overrides], loaders=TINY
    )
    trainable = {
        "lora": 2 * 2 * (8 * 32 + 32 * 8),
        "vera": 2 * 2 * (8 + 32),  # lambda_d (r) + lambda_b (out) per target
        "unilora": 23_040,
        "condlora": 2 * 2 * 32 * 8,  # one (A, B) pair per target name
        "head": 0,
        "bitfit": None,
        "full": None,
    }[adapter]
    if trainable is not None:
        assert result["params"]["adapter"] == trainable
    assert result["params"]["head"] == 32 * 32 + 32 + 32 * 2 + 2
    assert (tmp_path / "rte" / f"{adapter}-base" / "seed42" / "adapter.safetensors").is_file()


# Trainable adapter parameters on RoBERTa-base q,v with the reference's defaults, as its
# --compute_params_only reports them (PEFT's counts of the same configs).
REFERENCE_COUNTS = {"gpart": 23_040, "lora": 294_912, "vera": 18_624, "unilora": 23_040, "condlora": 24_576}


@pytest.mark.parametrize("adapter", sorted(REFERENCE_COUNTS))
def test_baseline_counts_on_roberta_base_equal_the_reference(adapter):
    (counts,) = glue.main(["--adapter_type", adapter, "--tasks", "rte", "--compute_params_only"])
    assert counts["adapter"] == REFERENCE_COUNTS[adapter]


def test_compute_params_only_for_roberta_base(capsys):
    (counts,) = glue.main(["--compute_params_only", "--tasks", "cola"])
    head = 768 * 768 + 768 + 768 * 2 + 2  # RobertaClassificationHead: dense + out_proj
    assert counts["adapter"] == 23_040 and counts["head"] == head
    out = capsys.readouterr().out
    assert "theta/adapter = 23,040" in out and f"head = {head:,}" in out


def test_metrics_come_from_the_libraries():
    assert glue.score("accuracy", [1, 0, 1], [1, 1, 1]) == pytest.approx(2 / 3)
    assert glue.score("matthews", [1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    import numpy as np

    a, b = [1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 6.5, 9.0]
    assert glue.score("pearson", a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)


def test_eval_entry_point_reads_run_folders_and_reference_folders(tmp_path):
    import gpart

    sys.path.insert(0, str(Path(glue.__file__).parent))
    import eval_roberta_glue

    (final,) = glue.main(["--tasks", "rte", "--output_dir", str(tmp_path / "runs"), *FAST], loaders=TINY)
    run_folder = tmp_path / "runs" / "rte" / "gpart-base" / "seed42"
    batch = ["training.batch_size", "8"]
    (from_run,) = eval_roberta_glue.main(
        ["--adapter_path", str(run_folder), "--tasks", "rte", *batch], loaders=TINY
    )
    assert from_run["test_metric"] == pytest.approx(final["test_metric"])

    # The same adapter written in the reference's layout (PEFT folder) evaluates the same.
    from types import SimpleNamespace

    model, _ = tiny_model(SimpleNamespace(task=SimpleNamespace(num_labels=2)))
    gpart.load(model, run_folder / "adapter.safetensors")
    gpart.save_peft(model, tmp_path / "reference")
    assert (tmp_path / "reference" / "adapter_config.json").is_file()
    argv = ["--adapter_path", str(tmp_path / "reference"), "--tasks", "rte", *batch]
    (from_reference,) = eval_roberta_glue.main(argv, loaders=TINY)
    assert from_reference["test_metric"] == pytest.approx(final["test_metric"])
