"""gpart on real architectures: theta = 0 changes nothing; a few steps reduce a loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpart

transformers = pytest.importorskip("transformers")


def _check(model: nn.Module, batch: dict, loss_fn, *, steps: int = 8, lr: float = 0.05, **apply_kwargs):
    """Apply gpart; outputs equal at theta = 0; training lowers the loss; return the model."""
    model.eval()
    with torch.no_grad():
        before = loss_fn(model, batch)
    gpart.apply(model, **apply_kwargs)
    with torch.no_grad():
        assert torch.equal(loss_fn(model, batch), before)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p is gpart.theta(model) for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    first = None
    for _ in range(steps):
        loss = loss_fn(model, batch)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert loss_fn(model, batch).item() < first
    return model


# ---------------------------------------------------------------- pure torch


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 5)

    def forward(self, ids):
        return self.proj(self.emb(ids)).mean(1)


class Experts(nn.Module):
    """A custom module with a raw 3-D parameter, like a mixture-of-experts weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 8) / 8**0.5)
        self.gate = nn.Linear(8, 3)

    def forward(self, x):
        mix = torch.softmax(self.gate(x), -1)
        return torch.einsum("be,eio,bi->bo", mix, self.w, x)


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def test_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    batch = {"x": torch.randn(16, 10), "y": torch.randint(0, 4, (16,))}
    _check(model, batch, _ce, d=64, seed=0, targets=["0"], trainable=["2"])


def test_conv2d():
    torch.manual_seed(0)
    batch = {"x": torch.randn(8, 3, 6, 6), "y": torch.randint(0, 4, (8,))}
    model = _check(ConvNet(), batch, _ce, d=100, seed=1, targets=["conv1", "conv2"], bias="all")
    assert [t.shape for t in model.gpart.layout.targets] == [(8, 3, 3, 3), (8,), (8, 8, 3, 3), (8,)]


def test_embedding():
    torch.manual_seed(0)
    batch = {"x": torch.randint(0, 50, (8, 6)), "y": torch.randint(0, 5, (8,))}
    model = _check(Tagger(), batch, _ce, d=80, seed=2, targets=["emb"], trainable=["proj"])
    assert model.gpart.layout.entries() == [("emb.weight", [50, 16])]


def test_custom_raw_parameter():
    torch.manual_seed(0)
    batch = {"x": torch.randn(16, 8), "y": torch.randint(0, 8, (16,))}
    model = _check(Experts(), batch, _ce, d=40, seed=3, targets=[], target_parameters=["w"])
    assert model.gpart.layout.entries() == [("w", [3, 8, 8])]


# ---------------------------------------------------------------- transformers, built from configs


def _seq_cls_loss(model, batch):
    return model(**batch).loss


def _text_batch(vocab: int, labels: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(3, vocab, (4, 12), generator=g),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "labels": torch.randint(0, labels, (4,), generator=g),
    }


SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


@pytest.mark.parametrize("arch", ["Bert", "Roberta"])
def test_bert_family_sequence_classification(arch):
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(vocab_size=60, max_position_embeddings=40, **SMALL)
    model = getattr(transformers, f"{arch}ForSequenceClassification")(config)
    _check(
        model,
        _text_batch(60),
        _seq_cls_loss,
        d=256,
        seed=0,
        targets=["query", "value"],
        trainable=["classifier"],
    )
    assert len(model.gpart.layout.targets) == 4


def test_vit_image_classification():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_labels=3, **SMALL)
    model = transformers.ViTForImageClassification(config)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}
    names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    targets = (
        ["query", "value"] if "query" in names else ["q_proj", "v_proj"]
    )  # transformers >= 5 renamed them
    _check(model, batch, _seq_cls_loss, d=256, seed=0, targets=targets, trainable=["classifier"])
    assert len(model.gpart.layout.targets) == 4


def _lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


@pytest.mark.parametrize("arch", ["Llama", "Qwen2"])
def test_decoder_lm_all_linear(arch):
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=64, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **SMALL
    )
    model = getattr(transformers, f"{arch}ForCausalLM")(config)
    batch = {"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))}
    _check(model, batch, _lm_loss, d=512, seed=0, targets="all-linear", dropout=0.05)
    names = [t.name for t in model.gpart.layout.targets]
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert names[:3] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ]


def test_gpt2_conv1d_flattened_as_stored():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    batch = {"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))}
    _check(model, batch, _lm_loss, d=512, seed=0, targets="all-linear")
    entries = model.gpart.layout.entries()
    assert entries[0] == ("transformer.h.0.attn.c_attn.weight", [32, 96])  # Conv1D stores (in, out)
    assert len(entries) == 2 * 4 and not any("lm_head" in n or "wte" in n for n, _ in entries)
