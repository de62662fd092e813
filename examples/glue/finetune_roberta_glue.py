"""GLUE with RoBERTa: GPart and the baselines (LoRA, VeRA, Uni-LoRA, CondLoRA, full, head-only,
BitFit) through one runner, with the reference's command line.

    python examples/glue/finetune_roberta_glue.py --adapter_type gpart --tasks sst2 qnli --seed 123
    python examples/glue/finetune_roberta_glue.py --tasks cola,sst2,mrpc,qnli,rte,stsb --seeds 0,1,2
    python examples/glue/finetune_roberta_glue.py --model_size large --tasks rte adapter.d 23040
    python examples/glue/finetune_roberta_glue.py --adapter_type vera --tasks mrpc training.lr 4e-3
    python examples/glue/finetune_roberta_glue.py --compute_params_only      # no download needed
    python examples/glue/finetune_roberta_glue.py --dry_run                  # the resolved configs
    python examples/glue/collect_results_glue.py runs/glue                  # the table

Recipe (the paper's, ``../shared/spec/experiments.md``): targets query/value, d = 23,040, dropout
0.1, theta lr 5e-3, weight decay 0.1, batch 32, max length 512, linear schedule with 6% warmup,
fp32; per-task epochs and head lr; model selection on a validation split carved from train
(15%, at least 300 examples, seeded); the GLUE dev set is reported as the test set. Metrics:
Matthews correlation (CoLA), Pearson (STS-B), accuracy (others), from scikit-learn / SciPy.

Baselines use the reference's presets: VeRA (r 8, d_initial 0.1, dropout 0.1) and CondLoRA
(r 8, alpha 8, dropout 0.1) at lr 1e-3 and head lr 1e-3, Uni-LoRA (r 4, 23,040 entries, init
+-0.02, dropout 0.1) at lr 5e-3 with its own per-task head lr, and their per-task epochs.

Each run writes ``OUTPUT_DIR/<task>/<adapter>-<size>/seed<k>/``: ``config.json`` (resolved, with
the level that set each value), ``metrics.jsonl`` (one line per epoch), ``final.json`` and the
adapter file. Loading data and models is the only hub-dependent step (``Loaders``); the tests swap
it for a tiny generated dataset and a RoBERTa built from a small config.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import adapters, cli, training
from common.config import Presets

# Task -> text fields, metric, labels (STS-B is a regression: one output).
TASKS = {
    "cola": (("sentence", None), "matthews", 2),
    "sst2": (("sentence", None), "accuracy", 2),
    "mrpc": (("sentence1", "sentence2"), "accuracy", 2),
    "qnli": (("question", "sentence"), "accuracy", 2),
    "rte": (("sentence1", "sentence2"), "accuracy", 2),
    "stsb": (("sentence1", "sentence2"), "pearson", 1),
}
_EPOCHS_HEAD_LR = {
    "base": {
        "cola": (80, 2e-3),
        "sst2": (60, 5e-4),
        "mrpc": (30, 1e-3),
        "qnli": (25, 1e-3),
        "rte": (160, 1e-2),
        "stsb": (80, 2e-4),
    },
    "large": {
        "cola": (60, 2e-2),
        "sst2": (30, 2e-4),
        "mrpc": (40, 2e-3),
        "qnli": (25, 5e-3),
        "rte": (120, 5e-3),
        "stsb": (80, 1e-4),
    },
}
# The reference's per-task (epochs, head_lr) of the baselines that differ from gpart's.
_BASELINE_EPOCHS = {"cola": 80, "sst2": 60, "mrpc": 30, "qnli": 25, "rte": 80, "stsb": 40}
_UNILORA_HEAD_LR = {
    "base": {"cola": 5e-3, "sst2": 1e-4, "mrpc": 2e-2, "qnli": 2e-4, "rte": 5e-4, "stsb": 2e-4},
    "large": {"cola": 2e-2, "sst2": 2e-4, "mrpc": 2e-3, "qnli": 5e-3, "rte": 5e-3, "stsb": 1e-4},
}
_UNILORA_LARGE_EPOCHS = {"cola": 40, "sst2": 20, "mrpc": 40, "qnli": 20, "rte": 40, "stsb": 40}
PRESETS = Presets(
    adapter={
        "gpart": {"training.lr": 5e-3, "adapter.d": 23_040, "adapter.dropout": 0.1},
        "lora": {"training.lr": 4e-4},
        "vera": {"training.lr": 1e-3},
        "unilora": {"training.lr": 5e-3},
        "condlora": {"training.lr": 1e-3},
        "full": {"training.lr": 2e-5},
        "head": {},
        "bitfit": {"training.lr": 1e-3},
    },
    task={
        task: {
            "task.metric": metric,
            "task.num_labels": labels,
            "training.epochs": _EPOCHS_HEAD_LR["base"][task][0],
            "training.head_lr": _EPOCHS_HEAD_LR["base"][task][1],
        }
        for task, (_, metric, labels) in TASKS.items()
    },
    size={
        "base": {"model_name": "FacebookAI/roberta-base"},
        "large": {"model_name": "FacebookAI/roberta-large"},
    },
    size_task={
        ("large", task): {"training.epochs": epochs, "training.head_lr": head_lr}
        for task, (epochs, head_lr) in _EPOCHS_HEAD_LR["large"].items()
    },
    adapter_task={
        **{
            (kind, task): {"training.epochs": epochs, "training.head_lr": 1e-3}
            for kind in ("vera", "condlora")
            for task, epochs in _BASELINE_EPOCHS.items()
        },
        **{
            ("unilora", task): {"training.epochs": epochs, "training.head_lr": _UNILORA_HEAD_LR["base"][task]}
            for task, epochs in _BASELINE_EPOCHS.items()
        },
    },
    size_adapter_task={
        **{
            ("large", kind, task): {"training.epochs": epochs, "training.head_lr": 1e-3}
            for kind in ("vera", "condlora")
            for task, epochs in _BASELINE_EPOCHS.items()
        },
        **{
            ("large", "unilora", task): {
                "training.epochs": _UNILORA_LARGE_EPOCHS[task],
                "training.head_lr": _UNILORA_HEAD_LR["large"][task],
            }
            for task in _BASELINE_EPOCHS
        },
    },
)
SPEC = cli.Spec(
    default_tasks=["cola", "sst2", "mrpc", "stsb", "qnli", "rte"],  # the reference's order
    flags={"--base_model": cli.Flag({"*": "model_name"}, help="hub id or folder (overrides --model_size's)")},
)
HEAD = ["classifier"]


# ---------------------------------------------------------------------------------------- loading


@dataclass
class Loaders:
    """The hub-dependent steps: ``data(task) -> {"train": rows, "validation": rows}`` and
    ``model(cfg) -> (model, tokenizer)``."""

    data: Callable[[str], dict[str, list[dict]]]
    model: Callable[[object], tuple[torch.nn.Module, Callable]]


def hub_data(task: str) -> dict[str, list[dict]]:
    def load():
        from datasets import load_dataset

        ds = load_dataset("nyu-mll/glue", task)
        return {"train": list(ds["train"]), "validation": list(ds["validation"])}

    return cli.hub(f"GLUE {task} (nyu-mll/glue)", load)


def hub_model(cfg):
    def load():
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model_name)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            cfg.model_name, num_labels=cfg.task.num_labels
        )
        return model, tokenizer

    return cli.hub(f"the model {cfg.model_name!r}", load)


HUB = Loaders(data=hub_data, model=hub_model)


def architecture(size: str, num_labels: int):
    """RoBERTa-base/-large shapes from transformers' config, on the meta device (parameter counts)."""
    import transformers

    shape = (
        {}
        if size == "base"
        else {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
        }
    )
    config = transformers.RobertaConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=num_labels, **shape
    )
    with torch.device("meta"):
        return transformers.RobertaForSequenceClassification(config)


# ---------------------------------------------------------------------------------------- running


def score(metric: str, preds, labels) -> float:
    """The task's metric from a well-kept library (scikit-learn, SciPy)."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    if metric == "matthews":
        return float(matthews_corrcoef(labels, preds))
    if metric == "pearson":
        from scipy.stats import pearsonr

        return float(pearsonr(preds, labels)[0])
    return float(accuracy_score(labels, preds))


def carve(rows: list[dict], training, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): a seeded ``val_fraction`` of train, at least ``min_val_examples``
    (at most half of it, for tiny test data)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = min(max(int(training.val_fraction * len(rows)), training.min_val_examples), len(rows) // 2)
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def batches(rows, tokenizer, keys, cfg, *, shuffle: bool, seed: int = 0):
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    size = cfg.training.batch_size
    for lo in range(0, len(order), size):
        chunk = [rows[i] for i in order[lo : lo + size]]
        first = [r[keys[0]] for r in chunk]
        second = [r[keys[1]] for r in chunk] if keys[1] else None
        enc = tokenizer(
            first,
            second,
            truncation=True,
            max_length=cfg.training.max_seq_length,
            padding=True,
            return_tensors="pt",
        )
        dtype = torch.float32 if cfg.task.num_labels == 1 else torch.long
        yield dict(enc), torch.tensor([r["label"] for r in chunk], dtype=dtype)


def evaluate(model, rows, tokenizer, keys, cfg) -> float:
    preds, labels = [], []
    with torch.no_grad():
        for enc, y in batches(rows, tokenizer, keys, cfg, shuffle=False):
            logits = model(**enc).logits
            preds += (logits.squeeze(-1) if cfg.task.num_labels == 1 else logits.argmax(-1)).tolist()
            labels += y.tolist()
    return score(cfg.task.metric, preds, labels)


def run(cfg, loaders: Loaders) -> dict:
    """Train one (task, adapter, size, seed) and write its run folder; return ``final.json``'s content."""
    folder = training.start(cfg)
    keys = TASKS[cfg.task.name][0]
    data = loaders.data(cfg.task.name)
    splits = dict(zip(("train", "val"), carve(data["train"], cfg.training, cfg.training.seed), strict=True))
    splits["test"] = data["validation"]  # GLUE dev = the test set
    model, tokenizer = loaders.model(cfg)

    def train_batches(epoch: int):
        return batches(
            splits["train"], tokenizer, keys, cfg, shuffle=True, seed=cfg.training.seed * 100_003 + epoch
        )

    return training.fit(
        cfg,
        model,
        folder,
        head=HEAD,
        train_batches=train_batches,
        steps_per_epoch=-(-len(splits["train"]) // cfg.training.batch_size),
        evaluate=lambda split: evaluate(model, splits[split], tokenizer, keys, cfg),
    )


def params_only(cfg) -> dict:
    model = architecture(cfg.model_size, cfg.task.num_labels)
    adapter_params, head_params = adapters.setup(model, cfg.adapter, head=HEAD, seed=cfg.training.seed)
    counts = adapters.count(adapter_params, head_params, model)
    print(
        f"{cfg.task.name} {cfg.adapter.kind} ({cfg.model_size}): theta/adapter = {counts['adapter']:,} | "
        f"head = {counts['head']:,} | trainable = {counts['trainable']:,} of {counts['total']:,} "
        f"({100 * counts['trainable'] / counts['total']:.3f}%)"
    )
    return counts


def main(argv: list[str] | None = None, loaders: Loaders = HUB) -> list[dict]:
    return training.main_loop(
        argv,
        doc=__doc__,
        presets=PRESETS,
        output_dir="runs/glue",
        run=lambda cfg: run(cfg, loaders),
        params_only=params_only,
        spec=SPEC,
    )


if __name__ == "__main__":
    sys.exit(cli.entry(main))
