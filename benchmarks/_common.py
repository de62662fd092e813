"""Shared pieces of the benchmarks: models from configs, the baselines, timing and memory helpers.

The baselines live here, not in the library:

* ``floor``: the frozen model computing gradients of the target weights only, no optimizer:
  the compute any GPart implementation must do.
* ``full``: the target weights trainable, AdamW.
* ``lora``: a minimal pure-torch LoRA (r=8, alpha=8) on the targets, AdamW.
* ``reference``: the authors' structure: ``y = base(x) + x @ delta^T`` per linear layer, delta
  from eager group ids, regenerated in backward by a custom autograd function.
* ``gpart``: this library (``gpart-eager`` / ``gpart-compiled`` force a kernel).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import gpart
from gpart.partition import _MIX1, _MIX2, _as_int64, group_counts, group_scales, hash_base

# Smoke tests point this elsewhere so that they never overwrite published results.
RESULTS = Path(os.environ.get("GPART_BENCH_RESULTS", Path(__file__).parent / "results"))
METHODS = ("floor", "full", "lora", "reference", "gpart")


# ----------------------------------------------------------------------------------------- models


def build(config: str, dtype: torch.dtype = torch.float32):
    """(model, batch, targets, d) for a named benchmark configuration, random weights, no downloads."""
    import transformers

    torch.manual_seed(0)
    if config == "tiny":  # smoke tests only
        cfg = transformers.RobertaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
        )
        model = transformers.RobertaForSequenceClassification(cfg)
        batch = {"input_ids": torch.randint(3, 100, (2, 16)), "labels": torch.randint(0, 2, (2,))}
        targets, d = ["query", "value"], 64
    elif config == "llama":  # (a) Llama-like decoder, all linear layers of the blocks
        cfg = transformers.LlamaConfig(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=256,
        )
        model = transformers.LlamaForCausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (8, 128))
        batch = {"input_ids": ids, "labels": ids}
        targets, d = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 131072
    elif config == "roberta":  # (b) RoBERTa-base-shaped encoder, query and value
        cfg = transformers.RobertaConfig(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
        )
        model = transformers.RobertaForSequenceClassification(cfg)
        batch = {"input_ids": torch.randint(3, cfg.vocab_size, (8, 128)), "labels": torch.randint(0, 2, (8,))}
        targets, d = ["query", "value"], 23040
    elif config == "minilm":  # (c) MiniLM-sized BERT: small layers, where fixed per-target costs show
        cfg = transformers.BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        )
        model = transformers.BertForSequenceClassification(cfg)
        batch = {
            "input_ids": torch.randint(3, cfg.vocab_size, (32, 32)),
            "labels": torch.randint(0, 2, (32,)),
        }
        targets, d = ["query", "value"], 23040
    elif config == "qwen2-0.5b":  # GPU only: Qwen2-0.5B-shaped, attention projections
        cfg = transformers.Qwen2Config(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
        model = transformers.Qwen2ForCausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (8, 512))
        batch = {"input_ids": ids, "labels": ids}
        targets, d = ["q_proj", "k_proj", "v_proj", "o_proj"], 131072
    else:
        raise ValueError(f"unknown config {config!r}")
    model.to(dtype).requires_grad_(False)
    return model, batch, targets, d


def target_modules(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
    ]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# -------------------------------------------------------------------------------------- baselines


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T``: the minimal LoRA used as a baseline."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + (x.to(self.lora_a.dtype) @ self.lora_a.T @ self.lora_b.T * self.scaling).to(
            x.dtype
        )


def _plain_group_ids(start: int, n: int, d: int, seed: int, device) -> torch.Tensor:
    """The partition's ids in plain tensor ops, as a straightforward implementation writes them
    (a fresh tensor per op, the logical shift as shift-and-mask, the unsigned remainder through
    ``remainder``): the reference-style baseline's hash, kept fixed so that gpart's own
    optimisations of :func:`gpart.partition.group_ids` do not speed up its baseline."""
    z = torch.arange(n, dtype=torch.int64, device=device) + hash_base(seed, start)
    for k, m in ((30, _MIX1), (27, _MIX2)):
        z = z ^ ((z >> k) & ((1 << (64 - k)) - 1))
        z = z * _as_int64(m)
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    r = torch.remainder(z, d)
    fix = (1 << 64) % d
    return torch.remainder(r + (z < 0).to(r.dtype) * fix, d) if fix else r


class _ReferenceDelta(torch.autograd.Function):
    """The authors' per-layer function: ``x @ delta^T`` with delta regenerated (eagerly) in backward."""

    @staticmethod
    def _delta(theta, scale, start, shape, d, seed):
        ids = _plain_group_ids(start, math.prod(shape), d, seed, theta.device)
        return (theta * scale)[ids].view(shape), ids

    @staticmethod
    def forward(ctx, x, theta, scale, start, shape, seed):
        delta, _ = _ReferenceDelta._delta(theta, scale, start, shape, theta.numel(), seed)
        ctx.save_for_backward(x, theta, scale)
        ctx.args = (start, shape, seed)
        return x @ delta.to(x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        x, theta, scale = ctx.saved_tensors
        start, shape, seed = ctx.args
        delta, ids = _ReferenceDelta._delta(theta, scale, start, shape, theta.numel(), seed)
        grad_x = grad @ delta.to(grad.dtype)
        grad_delta = grad.reshape(-1, shape[0]).T.float() @ x.reshape(-1, shape[1]).float()
        grad_theta = torch.zeros_like(theta).index_add_(0, ids, grad_delta.reshape(-1)) * scale
        return grad_x, grad_theta, None, None, None, None


class ReferenceLinear(nn.Module):
    def __init__(self, base: nn.Linear, holder: nn.Module, start: int, seed: int) -> None:
        super().__init__()
        self.base = base
        object.__setattr__(self, "holder", holder)
        self.start, self.seed = start, seed

    def forward(self, x):
        h = self.holder
        return self.base(x) + _ReferenceDelta.apply(
            x, h.theta, h.scale, self.start, tuple(self.base.weight.shape), self.seed
        )


def setup(method: str, model: nn.Module, targets: list[str], d: int) -> list[torch.Tensor]:
    """Prepare ``model`` for ``method``; return the parameters an optimizer should train."""
    mods = target_modules(model, targets)
    if method in ("floor", "full"):
        for _, m in mods:
            m.weight.requires_grad_(True)
        return [] if method == "floor" else [m.weight for _, m in mods]
    if method == "lora":
        params = []
        for name, m in mods:
            wrapped = LoRALinear(m)
            _replace(model, name, wrapped)
            params += [wrapped.lora_a, wrapped.lora_b]
        return params
    if method == "reference":
        holder = nn.Module()
        size = sum(m.weight.numel() for _, m in mods)
        holder.theta = nn.Parameter(torch.zeros(d))
        holder.register_buffer("scale", group_scales(group_counts(size, d=d, seed=0)))
        model.reference_holder = holder
        start = 0
        for name, m in mods:
            _replace(model, name, ReferenceLinear(m, holder, start, seed=0))
            start += m.weight.numel()
        return [holder.theta]
    if method.startswith("gpart"):
        backend = {"gpart": "auto", "gpart-eager": "eager", "gpart-compiled": "compiled"}[method]
        gpart.apply(model, d=d, seed=0, targets=targets, backend=backend)
        return [gpart.theta(model)]
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------------- measurement


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (a meta tensor counts what it would hold)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            seen[("meta", id(t))] = t.numel() * t.element_size()
        elif isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


def added_bytes(model: nn.Module, before: set[int], opt) -> int:
    """Persistent bytes a method added to the frozen model: new parameters/buffers + optimizer state."""
    new = [t for t in [*model.parameters(), *model.buffers()] if t.untyped_storage().data_ptr() not in before]
    state = [v for s in (opt.state.values() if opt else []) for v in s.values()]
    return tensor_bytes(new + state)


def transient_peak_bytes(step, device: str) -> int:
    """Peak of live tensor memory during one call of ``step`` above what was live before it."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu" if device == "cpu" else "cuda:0")
        _, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


def timed(fn, *, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpart": gpart.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
