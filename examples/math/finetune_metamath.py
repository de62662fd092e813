"""MetaMathQA fine-tuning of a causal LM with GPart or a baseline (the paper's math recipe).

    python examples/math/finetune_metamath.py --model_name Qwen/Qwen2.5-0.5B --adapter_type gpart --d 131072
    python examples/math/finetune_metamath.py --model_name Qwen/Qwen2.5-7B --adapter_type gpart --d 524288
    python examples/math/finetune_metamath.py --model_name Qwen/Qwen2.5-0.5B --adapter_type gpart \\
        --d 131072 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --learning_rate 2e-4
    python examples/math/finetune_metamath.py --model_name Qwen/Qwen2.5-0.5B --compute_params_only
    python examples/math/eval_math.py --model_path Qwen/Qwen2.5-0.5B \\
        --adapter_path runs/math/metamathqa/gpart-base/seed42/adapter.safetensors --dataset gsm8k

Recipe: targets q_proj,k_proj,v_proj,o_proj; dropout 0.05; bf16 base weights with fp32 theta;
text "Question: {query}\\nAnswer: {response}" + EOS, loss on the whole sequence, at most 2,048
tokens keeping the last ones; 2 epochs, lr 2e-4, cosine schedule, 5% warmup, weight decay 0.01,
gradient-norm clip 1.0, effective batch 16 (2 x 8 accumulation), seed 42. Any causal LM works.
The reference's flags (``--d``, ``--rank``, ``--alpha``, ``--learning_rate``,
``--per_device_train_batch_size``, ...) set the same config keys as ``key value`` overrides;
LoRA and Uni-LoRA default to rank 4 (LoRA alpha 4), Uni-LoRA's vector to d entries.
``--compute_params_only`` builds the architecture from the model's config (on the meta device,
no weights), so it needs the config (a hub id reachable, or a local folder).

The run folder holds the resolved config, ``metrics.jsonl`` (loss per logging interval) and the
adapter (``adapter.safetensors``, a gpart file: theta and the settings).
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

PRESETS = Presets(
    defaults={
        "model_name": "Qwen/Qwen2.5-0.5B",
        "adapter.targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "adapter.dropout": 0.05,
        "adapter.d": 131_072,
        "training.lr": 2e-4,
        "training.epochs": 2,
        "training.schedule": "cosine",
        "training.warmup_ratio": 0.05,
        "training.weight_decay": 0.01,
        "training.max_grad_norm": 1.0,
        "training.batch_size": 2,
        "training.grad_accum": 8,
        "training.max_seq_length": 2048,
        "training.precision": "bf16",
        "training.model_selection": "last",
        "task.metric": "loss",
    },
    adapter={
        "gpart": {},
        "lora": {"adapter.r": 4, "adapter.alpha": 4.0},
        "unilora": {"adapter.r": 4, "adapter.theta_d_length": 131_072, "adapter.init_theta_d_bound": 0.0},
        "vera": {},
        "condlora": {},
        "full": {"training.lr": 1e-5},
    },
    task={"metamathqa": {}},
)
SPEC = cli.Spec(
    default_tasks=["metamathqa"],
    flags={
        "--model_name": cli.Flag({"*": "model_name"}, help="hub id or local folder"),
        "--d": cli.Flag({"*": "adapter.d", "unilora": "adapter.theta_d_length"}, int),
        "--rank": cli.Flag({"*": "adapter.r"}, int),
        "--alpha": cli.Flag({"*": "adapter.alpha"}, float),
        "--dropout": cli.Flag({"*": "adapter.dropout"}, float),
        "--init_bound": cli.Flag({"*": "adapter.init_bound", "unilora": "adapter.init_theta_d_bound"}, float),
        "--max_seq_length": cli.Flag({"*": "training.max_seq_length"}, int),
        "--num_train_epochs": cli.Flag({"*": "training.epochs"}, int),
        "--per_device_train_batch_size": cli.Flag({"*": "training.batch_size"}, int),
        "--gradient_accumulation_steps": cli.Flag({"*": "training.grad_accum"}, int),
        "--learning_rate": cli.Flag({"*": "training.lr"}, float),
        "--lr_scheduler_type": cli.Flag({"*": "training.schedule"}, choices=("cosine", "linear")),
        "--warmup_ratio": cli.Flag({"*": "training.warmup_ratio"}, float),
        "--weight_decay": cli.Flag({"*": "training.weight_decay"}, float),
        "--max_grad_norm": cli.Flag({"*": "training.max_grad_norm"}, float),
        "--bf16": cli.Flag({"*": "training.precision"}, action="store_true", convert=lambda _: "bf16"),
        "--fp16": cli.Flag({"*": "training.precision"}, action="store_true", convert=lambda _: "fp16"),
        "--output_root_dir": cli.Flag({"*": "output_dir"}, help="the reference's name for --output_dir"),
    },
)
PROMPT = "Question: {query}\nAnswer: "


@dataclass
class Loaders:
    """``data() -> [{"query", "response"}]`` and ``model(cfg) -> (model, tokenizer)``."""

    data: Callable[[], list[dict]]
    model: Callable


def hub_data() -> list[dict]:
    def load():
        from datasets import load_dataset

        return list(load_dataset("meta-math/MetaMathQA", split="train"))

    return cli.hub("MetaMathQA (meta-math/MetaMathQA)", load)


def hub_model(cfg):
    def load():
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model_name)
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model_name, torch_dtype=torch.bfloat16)
        return model, tokenizer

    return cli.hub(f"the model {cfg.model_name!r}", load)


def hub_config(cfg):
    """The model's architecture config only (no weights), for parameter counts."""

    def load():
        import transformers

        return transformers.AutoConfig.from_pretrained(cfg.model_name)

    fix = (
        "--compute_params_only builds the model from its config.json: pass --model_name a local folder "
        "holding it, or run where the hub is reachable (--dry_run needs nothing)."
    )
    return cli.hub(f"the config of {cfg.model_name!r}", load, fix)


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


def params_only(cfg, config) -> dict:
    """Trainable counts of the adapter on the architecture (meta device: shapes only)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    counts = adapters.count(*adapters.setup(model, cfg.adapter, head=[], seed=cfg.training.seed), model)
    print(
        f"{cfg.model_name} {cfg.adapter.kind}: adapter = {counts['adapter']:,} | trainable = "
        f"{counts['trainable']:,} of {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.3f}%)"
    )
    return counts


def main(argv: list[str] | None = None, loaders: Loaders = HUB, config_loader: Callable = hub_config):
    args, cfgs = cli.configs(
        argv, doc=__doc__, presets=PRESETS, spec=SPEC, output_dir="runs/math", multi_task=False
    )
    if args.dry_run:
        return cli.dry_run(cfgs)
    if args.compute_params_only:
        return [params_only(cfg, config_loader(cfg)) for cfg in cfgs]
    out = [run(cfg, loaders) for cfg in cfgs]
    return out[0] if len(out) == 1 else out


if __name__ == "__main__":
    sys.exit(cli.entry(main))
