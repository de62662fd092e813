"""Set a model up for each adapter type of the runners: gpart, lora, full, head, bitfit.

:func:`setup` returns the adapter's trainable parameters and the head's (every method trains the
task head). LoRA is the minimal pure-torch LoRA below (``W x + (alpha / r) B A x``, B zero-init),
so the baselines need no PEFT.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import gpart


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scaling


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def setup(
    model: nn.Module, adapter, *, head: list[str], seed: int
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Freeze ``model`` and make the adapter's parameters trainable: ``(adapter_params, head_params)``."""
    kind = adapter.kind
    if kind == "gpart":
        gpart.apply(
            model,
            d=adapter.d,
            seed=seed if adapter.seed is None else adapter.seed,
            targets=list(adapter.targets),
            dropout=adapter.dropout,
            isometric=adapter.isometric,
            bias=adapter.bias,
            init_bound=adapter.init_bound,
            trainable=head,
        )
        theta = gpart.theta(model)
        return [theta], [p for p in model.parameters() if p.requires_grad and p is not theta]
    model.requires_grad_(kind == "full")
    head_params = []
    for name, module in model.named_modules():
        if _matches(name, head):
            module.requires_grad_(True)
            head_params += list(module.parameters())
    head_ids = {id(p) for p in head_params}
    if kind == "lora":
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and _matches(name, list(adapter.targets)):
                parent, _, child = name.rpartition(".")
                setattr(
                    model.get_submodule(parent),
                    child,
                    LoRALinear(module, adapter.r, adapter.alpha, adapter.dropout),
                )
    elif kind == "bitfit":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif kind not in ("full", "head"):
        raise ValueError(f"no set-up for adapter type {kind!r}")
    adapter_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return adapter_params, head_params


def param_groups(adapter_params, head_params, training) -> list[dict]:
    """AdamW groups: the adapter at ``lr`` with weight decay; the head at ``head_lr``, decay on matrices."""
    groups = [{"params": adapter_params, "lr": training.lr, "weight_decay": training.weight_decay}]
    matrices = [p for p in head_params if p.ndim > 1]
    vectors = [p for p in head_params if p.ndim <= 1]
    groups += [
        {"params": matrices, "lr": training.head_lr, "weight_decay": training.weight_decay},
        {"params": vectors, "lr": training.head_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors (the best epoch's adapter and head)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in state.items():
            model.get_parameter(name).copy_(value)


def save_adapter(model: nn.Module, path) -> None:
    """gpart's file for gpart; a plain safetensors file of the trainable tensors otherwise."""
    if hasattr(model, "gpart"):
        gpart.save(model, path)
    else:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in trainable_state(model).items()}, str(path))


def count(adapter_params, head_params, model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for p in adapter_params)
    head = sum(p.numel() for p in head_params)
    return {"adapter": adapter, "head": head, "trainable": adapter + head, "total": total}
