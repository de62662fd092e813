"""MetaMathQA fine-tuning of a causal LM with GPart (the paper's math recipe).

    python examples/math/finetune_metamath.py --model_name Qwen/Qwen2.5-0.5B adapter.d 131072
    python examples/math/finetune_metamath.py --model_name Qwen/Qwen2.5-7B adapter.d 524288
    python examples/math/eval_math.py --model_name Qwen/Qwen2.5-0.5B \\
        --adapter runs/math/metamathqa/gpart-base/seed0/adapter.safetensors

Recipe: targets q_proj,k_proj,v_proj,o_proj; dropout 0.05; bf16 base weights with fp32 theta;
text "Question: {query}\\nAnswer: {response}" + EOS, loss on the whole sequence, at most 2,048
tokens keeping the last ones; 2 epochs, lr 2e-4, cosine schedule, 5% warmup, weight decay 0.01,
gradient-norm clip 1.0, effective batch 16 (4 x 4 accumulation). Any causal LM works.

The run folder holds the resolved config, ``metrics.jsonl`` (loss per logging interval) and the
adapter (``adapter.safetensors``, a gpart file: theta and the settings).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import training
from common.config import Presets, add_arguments, resolve

PRESETS = Presets(
    defaults={
        "adapter.targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "adapter.dropout": 0.05,
        "adapter.d": 131_072,
        "training.lr": 2e-4,
        "training.epochs": 2,
        "training.schedule": "cosine",
        "training.warmup_ratio": 0.05,
        "training.weight_decay": 0.01,
        "training.max_grad_norm": 1.0,
        "training.batch_size": 4,
        "training.grad_accum": 4,
        "training.max_seq_length": 2048,
        "training.precision": "bf16",
        "training.model_selection": "last",
        "task.metric": "loss",
    },
    adapter={"gpart": {}, "lora": {"adapter.r": 8, "adapter.alpha": 16.0}, "full": {"training.lr": 1e-5}},
    task={"metamathqa": {}},
)
PROMPT = "Question: {query}\nAnswer: "


@dataclass
class Loaders:
    """``data() -> [{"query", "response"}]`` and ``model(cfg) -> (model, tokenizer)``."""

    data: Callable[[], list[dict]]
    model: Callable


def hub_data() -> list[dict]:
    from datasets import load_dataset

    return list(load_dataset("meta-math/MetaMathQA", split="train"))


def hub_model(cfg):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model_name)
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model_name, torch_dtype=torch.bfloat16)
    return model, tokenizer


HUB = Loaders(data=hub_data, model=hub_model)


def encode(rows: list[dict], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of "Question: ...\\nAnswer: ..." + EOS, keeping the last ``max_length`` tokens."""
    out = []
    for r in rows:
        ids = tokenizer(PROMPT.format(query=r["query"]) + r["response"], add_special_tokens=True)["input_ids"]
        ids = [*ids, tokenizer.eos_token_id][-max_length:]
        out.append(ids)
    return out


def collate(seqs: list[list[int]], pad_id: int, device) -> dict:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # loss on the whole sequence, not on padding
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, labels.to(device)


def run(cfg, loaders: Loaders) -> dict:
    folder = training.start(cfg)
    model, tokenizer = loaders.model(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    seqs = encode(loaders.data(), tokenizer, cfg.training.max_seq_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bs = cfg.training.batch_size

    def train_batches(epoch: int):
        order = list(range(len(seqs)))
        random.Random(cfg.training.seed * 7919 + epoch).shuffle(order)
        for lo in range(0, len(order), bs):
            yield collate([seqs[i] for i in order[lo : lo + bs]], pad, device)

    held_out = seqs[: max(1, min(64, len(seqs) // 10))]

    def evaluate(split: str) -> float:
        """Minus the mean loss on a few training sequences: a sanity signal; accuracy is eval_math.py's."""
        with torch.no_grad():
            inputs, labels = collate(held_out, pad, device)
            return -float(model(**inputs, labels=labels).loss)

    final = training.fit(
        cfg,
        model,
        folder,
        head=[],
        train_batches=train_batches,
        steps_per_epoch=-(-len(seqs) // bs),
        evaluate=evaluate,
    )
    return final


def main(argv: list[str] | None = None, loaders: Loaders = HUB) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser, PRESETS)
    parser.add_argument("--model_name", default="Qwen/Qwen2.5-0.5B")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="runs/math")
    args = parser.parse_args(argv)
    cfg = resolve(
        PRESETS,
        adapter_type=args.adapter_type,
        task="metamathqa",
        overrides=[
            "model_name",
            args.model_name,
            "training.seed",
            str(args.seed),
            "output_dir",
            args.output_dir,
            *args.overrides,
        ],
    )
    return run(cfg, loaders)


if __name__ == "__main__":
    main()
