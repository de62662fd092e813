"""Hugging Face Trainer: training, the adapter-saving callback, gradient checkpointing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import gpart

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "huggingface"))
from train_trainer import ADAPTER_FILE, ToyTask, tiny_bert, train


def test_trainer_trains_theta_and_head_and_the_callback_saves_the_adapter(tmp_path):
    model, trainer = train(str(tmp_path), steps=20, save_steps=10)
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(gpart.theta(model)), id(model.classifier.weight), id(model.classifier.bias)}
    assert gpart.theta(model).abs().sum() > 0

    final = tmp_path / ADAPTER_FILE
    for path in (tmp_path / "checkpoint-10" / ADAPTER_FILE, tmp_path / "checkpoint-20" / ADAPTER_FILE, final):
        assert path.is_file()
    assert torch.equal(
        gpart.read(tmp_path / "checkpoint-20" / ADAPTER_FILE)[0]["theta"], gpart.read(final)[0]["theta"]
    )
    assert not torch.equal(
        gpart.read(tmp_path / "checkpoint-10" / ADAPTER_FILE)[0]["theta"], gpart.read(final)[0]["theta"]
    )

    fresh = gpart.load(tiny_bert(), final)
    batch = ToyTask(n=8, seed=1).ids
    model.eval()
    assert torch.equal(fresh.eval()(input_ids=batch).logits, model(input_ids=batch).logits)


def test_trainer_with_gradient_checkpointing_trains_the_same_theta(tmp_path):
    plain, _ = train(str(tmp_path / "plain"), steps=6, save_steps=100)
    checkpointed, _ = train(str(tmp_path / "gc"), steps=6, save_steps=100, gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    torch.testing.assert_close(gpart.theta(checkpointed), gpart.theta(plain), rtol=1e-5, atol=1e-7)


def _checkpointing(model, **kwargs) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def _tiny_vit():
    """Its main input is pixel_values, so transformers does not make the inputs require grad."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
    )
    return transformers.ViTForImageClassification(config)


def _theta_grad(arch: str, setup) -> torch.Tensor:
    model = tiny_bert() if arch == "bert" else _tiny_vit()
    gpart.apply(model, d=128, seed=3, trainable=["classifier"], dropout=0.1)
    setup(model)
    model.train()
    if arch == "bert":
        data = ToyTask(n=4, seed=2)
        batch = {"input_ids": data.ids, "labels": data.labels}
    else:
        batch = {"pixel_values": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))}
        batch["labels"] = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(1)
    model(**batch).loss.backward()
    return gpart.theta(model).grad


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_gradient_checkpointing_gives_the_plain_gradient(arch):
    plain = _theta_grad(arch, lambda m: None)
    assert plain.abs().sum() > 0
    non_reentrant = _theta_grad(arch, _checkpointing)  # the default: non-reentrant
    torch.testing.assert_close(non_reentrant, plain, rtol=1e-5, atol=1e-8)

    def reentrant_with_input_grads(m):
        _checkpointing(m, use_reentrant=True)
        m.enable_input_require_grads()

    torch.testing.assert_close(_theta_grad(arch, reentrant_with_input_grads), plain, rtol=1e-5, atol=1e-8)


def test_reentrant_checkpointing_that_would_lose_gradient_is_refused():
    # ViT's inputs are pixels: with reentrant checkpointing no block input requires grad, and
    # without gpart's check theta would silently get no gradient from the checkpointed blocks.
    with pytest.raises(gpart.StateError, match="enable_input_require_grads"):
        _theta_grad("vit", lambda m: _checkpointing(m, use_reentrant=True))
