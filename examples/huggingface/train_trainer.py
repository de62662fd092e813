"""gpart with the Hugging Face ``Trainer``: apply, train, save the adapter through a callback.

    python examples/huggingface/train_trainer.py                  # tiny BERT from a config, no downloads
    python examples/huggingface/train_trainer.py --gradient-checkpointing

The pattern:

1. build or load the model, then ``gpart.apply(model, d=..., seed=..., trainable=[head])``;
2. give ``Trainer`` the model as usual: only ``theta`` and the head require grad, so its
   optimizer trains exactly those;
3. add :class:`SaveGPartCallback`: at every checkpoint (and at the end) it writes the adapter,
   ``4 d`` bytes plus the head, next to Trainer's own files;
4. gradient checkpointing: ``model.gradient_checkpointing_enable()`` (transformers 5 calls it
   ``activation_checkpointing_enable``; non-reentrant by default). Reentrant checkpointing needs
   inputs that require grad: transformers arranges it for text models, not for pixel inputs
   (ViT); call ``model.enable_input_require_grads()`` there, or gpart raises instead of silently
   losing the checkpointed blocks' share of theta's gradient. Under DDP use non-reentrant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import gpart

ADAPTER_FILE = "gpart_adapter.safetensors"


class SaveGPartCallback(transformers.TrainerCallback):
    """Writes ``gpart.save(model)`` into each checkpoint folder and into ``output_dir`` at the end."""

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = (
            Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        if state.is_world_process_zero:
            gpart.save(model, folder / ADAPTER_FILE)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            gpart.save(model, Path(args.output_dir) / ADAPTER_FILE)


def tiny_bert(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return transformers.BertForSequenceClassification(config)


class ToyTask(torch.utils.data.Dataset):
    """Sequences of token ids; the label says whether token 7 occurs: a tiny learnable task."""

    def __init__(self, n: int = 64, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, 100, (n, length), generator=g)
        self.ids[: n // 2, 3] = 7
        self.labels = (self.ids == 7).any(-1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def train(output_dir: str, *, steps: int = 20, gradient_checkpointing: bool = False, save_steps: int = 10):
    model = tiny_bert()
    gpart.apply(model, d=256, seed=0, targets=["query", "value"], trainable=["classifier"])
    if gradient_checkpointing:  # non-reentrant by default in transformers 5
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
    args = transformers.TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=ToyTask(), callbacks=[SaveGPartCallback()]
    )
    trainer.train()
    return model, trainer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/trainer")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    model, _ = train(args.output_dir, steps=args.steps, gradient_checkpointing=args.gradient_checkpointing)
    print(gpart.summary(model))
    print(f"adapter: {Path(args.output_dir) / ADAPTER_FILE}")


if __name__ == "__main__":
    main()
