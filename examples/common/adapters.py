"""Set a model up for each adapter type of the runners: gpart and the paper's baselines.

:func:`setup` freezes the model, installs the adapter and returns its trainable parameters and the
head's (every method trains the task head). The baselines are pure PyTorch (no PEFT):

- ``lora``: ``W x + (alpha / r) B A x`` with B zero-initialised;
- ``vera``: frozen random A (r x in) and B (out x r) shared by all targets and drawn from one
  seeded generator (Kaiming uniform, A first), trainable ``lambda_d`` (r, starts at ``d_initial``)
  and ``lambda_b`` (out, starts at zero): ``delta W = diag(lambda_b) B diag(lambda_d) A``;
- ``unilora``: one global vector of length ``theta_d_length`` (uniform in +-``init_theta_d_bound``)
  projected into every LoRA factor: each entry of each A (r x in) and B (out x r) reads
  ``theta[idx] / sqrt(count(idx))`` through a balanced seeded assignment (every index used
  ``floor(N / d)`` times, the remainder spread without repetition, shuffled);
- ``condlora``: per target name (all ``query`` layers share one pair), two linear maps A, B
  (in -> r) applied to the frozen weight itself: ``delta W = (alpha / r) W B^T A W^T`` (square
  weights); B starts at zero;
- ``full``, ``head``, ``bitfit``: every weight, the head only, biases and the head.

Each wrapped layer can report its ``delta_weight()``, so evaluation runs on merged weights
(:func:`inference`) and :func:`merge` folds the adapters into plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gpart


class AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable update; subclasses give ``delta_weight()`` and may
    give a faster ``update(x)`` (the delta applied to an input without forming the matrix)."""

    def __init__(self, base: nn.Linear, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(dropout)
        self.merged_weight: torch.Tensor | None = None  # set by inference(): W0 + delta, computed once
        # The update trains in fp32 (fp64 for fp64 weights) whatever the frozen weight's dtype.
        self.factory = {
            "dtype": torch.promote_types(base.weight.dtype, torch.float32),
            "device": base.weight.device,
        }

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight, self.base.bias)
        return self.base(x) + self.update(self.dropout(x).to(self.factory["dtype"])).to(x.dtype)


class LoRALinear(AdapterLinear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__(base, dropout)
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, **self.factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, **self.factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / r

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_b @ self.lora_a

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_a.T @ self.lora_b.T) * self.scaling


class VeRALinear(AdapterLinear):
    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, d_initial: float, dropout: float):
        super().__init__(base, dropout)
        r = a.shape[0]
        a, b = a.to(**self.factory), b.to(**self.factory)
        # Slices of the shared matrices: kept as non-persistent buffers (regenerated from the key).
        self.register_buffer("vera_a", a[:, : base.in_features], persistent=False)
        self.register_buffer("vera_b", b[: base.out_features, :], persistent=False)
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **self.factory))
        self.lambda_b = nn.Parameter(torch.zeros(base.out_features, **self.factory))

    def delta_weight(self) -> torch.Tensor:
        return self.lambda_b[:, None] * (self.vera_b * self.lambda_d) @ self.vera_a

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.lambda_b * F.linear(self.lambda_d * F.linear(x, self.vera_a), self.vera_b)


class UniLoRALinear(AdapterLinear):
    def __init__(self, base: nn.Linear, theta: nn.Parameter, r: int, dropout: float) -> None:
        super().__init__(base, dropout)
        self.theta = theta  # shared by every target: model.parameters() lists it once
        dev = base.weight.device
        self.register_buffer("idx_a", torch.zeros(r, base.in_features, dtype=torch.long, device=dev))
        self.register_buffer("idx_b", torch.zeros(base.out_features, r, dtype=torch.long, device=dev))
        self.register_buffer("scale_a", torch.ones(r, base.in_features, **self.factory))
        self.register_buffer("scale_b", torch.ones(base.out_features, r, **self.factory))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.theta[self.idx_a] * self.scale_a, self.theta[self.idx_b] * self.scale_b

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return b @ a

    def update(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return F.linear(F.linear(x, a), b)


class CondLoRALinear(AdapterLinear):
    def __init__(self, base: nn.Linear, net_a: nn.Linear, net_b: nn.Linear, alpha: float, dropout: float):
        super().__init__(base, dropout)
        if base.in_features != base.out_features:
            raise ValueError(
                f"CondLoRA needs square weights (it maps the weight's rows through in -> r nets); got "
                f"{base.out_features}x{base.in_features}. Target square projections such as query/value."
            )
        self.net_a, self.net_b = net_a, net_b  # shared by every target of the same name
        self.scaling = alpha / net_a.out_features

    def delta_weight(self) -> torch.Tensor:
        w = self.base.weight.to(self.factory["dtype"])
        return self.scaling * self.net_b(w) @ self.net_a(w).T

    def update(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight.to(self.factory["dtype"])
        return F.linear(F.linear(x, self.net_a(w).T), self.net_b(w)) * self.scaling


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not found:
        raise ValueError(f"no nn.Linear named like {targets} in the model; set adapter.targets")
    return found


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def unilora_ids(total: int, d: int, seed: int) -> np.ndarray:
    """UniLoRA's balanced assignment of ``total`` slots to ``d`` indices: each index ``total // d``
    times, ``total % d`` more distinct ones drawn without replacement, then shuffled (numpy PCG64)."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(d), total // d)
    if total % d:
        ids = np.concatenate([ids, rng.choice(d, size=total % d, replace=False)])
    rng.shuffle(ids)
    return ids


def _install(model: nn.Module, adapter, seed: int) -> None:
    """Wrap the adapter's targets in place (the baselines other than full/head/bitfit)."""
    kind = adapter.kind
    found = _linear_targets(model, list(adapter.targets))
    if kind == "lora":
        for name, lin in found:
            _replace(model, name, LoRALinear(lin, adapter.r, adapter.alpha, adapter.dropout))
    elif kind == "vera":
        g = torch.Generator().manual_seed(adapter.projection_prng_key)
        shape_a = (adapter.r, max(lin.in_features for _, lin in found))
        shape_b = (max(lin.out_features for _, lin in found), adapter.r)
        w = found[0][1].weight
        factory = {"dtype": torch.promote_types(w.dtype, torch.float32), "device": w.device}
        # Drawn on the CPU in fp32 (the generator's stream), then one shared copy where the weights are.
        a = nn.init.kaiming_uniform_(torch.empty(shape_a), a=math.sqrt(5), generator=g).to(**factory)
        b = nn.init.kaiming_uniform_(torch.empty(shape_b), a=math.sqrt(5), generator=g).to(**factory)
        for name, lin in found:
            vera = VeRALinear(lin, a, b, adapter.d_initial, adapter.dropout)
            _replace(model, name, vera)
    elif kind == "unilora":
        bound = adapter.init_theta_d_bound
        w = found[0][1].weight
        theta = torch.empty(
            adapter.theta_d_length, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device
        )
        theta = nn.Parameter(theta.uniform_(-bound, bound))
        layers = [UniLoRALinear(lin, theta, adapter.r, adapter.dropout) for _, lin in found]
        slots = [buf for layer in layers for buf in (layer.idx_a, layer.idx_b)]
        ids = torch.from_numpy(unilora_ids(sum(s.numel() for s in slots), adapter.theta_d_length, seed))
        counts = torch.bincount(ids, minlength=adapter.theta_d_length).float()
        lo = 0
        for layer in layers:
            for idx, scale in ((layer.idx_a, layer.scale_a), (layer.idx_b, layer.scale_b)):
                chunk = ids[lo : lo + idx.numel()].view_as(idx)
                idx.copy_(chunk)
                scale.copy_(counts[chunk].rsqrt())
                lo += idx.numel()
        for (name, _), layer in zip(found, layers, strict=True):
            _replace(model, name, layer)
    elif kind == "condlora":
        nets: dict[str, tuple[nn.Linear, nn.Linear]] = {}
        for name, lin in found:
            key = name.rsplit(".", 1)[-1]
            if key not in nets:
                factory = {
                    "dtype": torch.promote_types(lin.weight.dtype, torch.float32),
                    "device": lin.weight.device,
                }
                net_a = nn.Linear(lin.in_features, adapter.r, bias=False, **factory)
                net_b = nn.Linear(lin.in_features, adapter.r, bias=False, **factory)
                nn.init.kaiming_uniform_(net_a.weight, a=math.sqrt(5))
                nn.init.zeros_(net_b.weight)
                nets[key] = (net_a, net_b)
            _replace(model, name, CondLoRALinear(lin, *nets[key], adapter.alpha, adapter.dropout))
    else:
        raise ValueError(f"no set-up for adapter type {kind!r}")


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
            **adapter.variant(),
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
    if kind == "bitfit":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif kind not in ("full", "head"):
        _install(model, adapter, seed)
    adapter_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return adapter_params, head_params


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate on merged weights: every delta is computed once on entry, not per batch
    (``gpart.cached`` for gpart; ``W0 + delta`` held by each wrapped layer for the baselines)."""
    wrapped = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    with contextlib.ExitStack() as stack:
        if gpart.adapters(model):
            stack.enter_context(gpart.cached(model))
        try:
            with torch.no_grad():
                for m in wrapped:
                    m.merged_weight = m.base.weight + m.delta_weight().to(m.base.weight.dtype)
            yield model
        finally:
            for m in wrapped:
                m.merged_weight = None


def load_merged(model: nn.Module, path) -> nn.Module:
    """Load an adapter for evaluation and merge it: a gpart file, a run folder holding
    ``adapter.safetensors``, or a folder saved by the reference (``gpart.load_peft``)."""
    from pathlib import Path

    from .cli import RunnerError

    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").exists():
        gpart.load_peft(model, path)
    elif path.is_dir() and (path / "adapter.safetensors").exists():
        gpart.load(model, path / "adapter.safetensors")
    elif path.is_file():
        gpart.load(model, path)
    else:
        raise RunnerError(
            f"adapter path {str(path)!r} is not a gpart file, a run folder with adapter.safetensors, or a "
            "reference adapter folder (adapter_config.json + adapter_model.safetensors)"
        )
    return merge(model)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into plain weights: ``gpart.merge`` for gpart, ``W0 + delta`` in a plain
    ``nn.Linear`` in place of each wrapped layer for the baselines."""
    if gpart.adapters(model):
        gpart.merge(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, AdapterLinear):
            with torch.no_grad():
                m.base.weight += m.delta_weight().to(m.base.weight.dtype)
            _replace(model, name, m.base)
    return model


def param_groups(adapter_params, head_params, training, *, kind: str = "gpart") -> list[dict]:
    """AdamW groups, as the reference builds them: the adapter at ``lr``, the head at ``head_lr``;
    weight decay on matrices only, except gpart's theta, which is always decayed."""
    wd = training.weight_decay
    decayed = [p for p in adapter_params if kind == "gpart" or p.ndim > 1]
    plain = [p for p in adapter_params if not (kind == "gpart" or p.ndim > 1)]
    groups = [
        {"params": decayed, "lr": training.lr, "weight_decay": wd},
        {"params": plain, "lr": training.lr, "weight_decay": 0.0},
        {"params": [p for p in head_params if p.ndim > 1], "lr": training.head_lr, "weight_decay": wd},
        {"params": [p for p in head_params if p.ndim <= 1], "lr": training.head_lr, "weight_decay": 0.0},
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
