"""Dataclass configs for the paper's runners, with layered overrides. No YAML.

Precedence, later wins:

1. dataclass defaults;
2. the adapter preset (``Presets.adapter[adapter_type]``);
3. the task's overrides (``Presets.task[task]``);
4. the model-size preset (``Presets.size[model_size]``, then ``Presets.size_task[(size, task)]``
   and ``Presets.size_adapter[(size, adapter_type)]``);
5. command-line ``key value`` pairs: ``adapter.d 16384 training.lr 0.001 adapter.isometric False``.

Every level speaks the same dotted keys (``adapter.*``, ``training.*``, ``task.*``, or a top-level
field such as ``model_name``). Values from the command line are converted with the field's type;
an unknown key or a value of the wrong type raises :class:`OverrideError` naming the key, the
expected type and close matches. The resolved config remembers which level set each key
(``sources``) and is saved with the run (:func:`save_config`).

Adding an adapter type is one dataclass registered with :func:`register_adapter`; it then shows
up in ``--adapter_type`` choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# ---------------------------------------------------------------------------------------- adapters


@dataclass
class AdapterConfig:
    """Base of every adapter config; ``kind`` is its registry name (``--adapter_type``)."""

    kind: ClassVar[str] = ""


ADAPTERS: dict[str, type[AdapterConfig]] = {}


def register_adapter(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make an adapter config selectable by ``--adapter_type cls.kind``."""
    if not cls.kind or cls.kind in ADAPTERS:
        raise ValueError(f"adapter kind {cls.kind!r} is empty or already registered")
    ADAPTERS[cls.kind] = cls
    return cls


@register_adapter
@dataclass
class GPartAdapter(AdapterConfig):
    """gpart: one vector theta of length d over the targets (``gpart.apply``'s options)."""

    kind: ClassVar[str] = "gpart"
    d: int = 23_040
    seed: int | None = None  # None: the run's seed
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    dropout: float = 0.1
    isometric: bool = True
    bias: str = "none"
    init_bound: float = 0.0
    # The reference's names for the variants (see docs/variants.md), mapped by variant().
    grouping_strategy: str = "random"  # random | signed_magnitude
    assignment_backend: str = "stateless"  # stateless | materialized (random grouping only)
    partition_scope: str = "global"  # global | transformer_block
    projection_type: str = "partition"  # partition | fastfood

    def variant(self) -> dict[str, str]:
        """``gpart.apply``'s names for the variant options."""
        known = {
            "grouping_strategy": ("random", "signed_magnitude"),
            "assignment_backend": ("stateless", "materialized"),
            "partition_scope": ("global", "transformer_block"),
            "projection_type": ("partition", "fastfood"),
        }
        for key, values in known.items():
            if getattr(self, key) not in values:
                raise OverrideError(f"adapter.{key} = {getattr(self, key)!r}: choose one of {list(values)}.")
        if self.grouping_strategy == "signed_magnitude":
            assignment = "signed_magnitude"
        else:
            assignment = "generator" if self.assignment_backend == "materialized" else "hash"
        return {
            "assignment": assignment,
            "scope": "block" if self.partition_scope == "transformer_block" else "global",
            "projection": self.projection_type,
        }


@register_adapter
@dataclass
class LoRAAdapter(AdapterConfig):
    kind: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["query", "value"])


@register_adapter
@dataclass
class VeRAAdapter(AdapterConfig):
    """VeRA: frozen shared random A, B; trainable scaling vectors (the reference's defaults)."""

    kind: ClassVar[str] = "vera"
    r: int = 8
    dropout: float = 0.1
    d_initial: float = 0.1
    projection_prng_key: int = 0
    targets: list[str] = field(default_factory=lambda: ["query", "value"])


@register_adapter
@dataclass
class UniLoRAAdapter(AdapterConfig):
    """Uni-LoRA: one global vector projected into every LoRA factor (the reference's defaults)."""

    kind: ClassVar[str] = "unilora"
    r: int = 4
    theta_d_length: int = 23_040
    dropout: float = 0.1
    init_theta_d_bound: float = 0.02
    targets: list[str] = field(default_factory=lambda: ["query", "value"])


@register_adapter
@dataclass
class CondLoRAAdapter(AdapterConfig):
    """CondLoRA: LoRA factors computed from the frozen weight by nets shared per target name."""

    kind: ClassVar[str] = "condlora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["query", "value"])


@register_adapter
@dataclass
class FullAdapter(AdapterConfig):
    """Full fine-tuning of every weight."""

    kind: ClassVar[str] = "full"


@register_adapter
@dataclass
class HeadAdapter(AdapterConfig):
    """Only the task head trains."""

    kind: ClassVar[str] = "head"


@register_adapter
@dataclass
class BitFitAdapter(AdapterConfig):
    """Biases (and the head) train."""

    kind: ClassVar[str] = "bitfit"


# ---------------------------------------------------------------------------------- the experiment


@dataclass
class TrainingConfig:
    lr: float = 1e-3  # the adapter's learning rate (theta, LoRA factors, ...)
    head_lr: float = 1e-3
    batch_size: int = 32
    grad_accum: int = 1
    epochs: int = 10
    max_seq_length: int = 512
    weight_decay: float = 0.1
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float | None = None
    model_selection: str = "best"  # "best" epoch on the validation split, or "last"
    val_fraction: float = 0.15
    min_val_examples: int = 300
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on a GPU)
    seed: int = 0


@dataclass
class TaskConfig:
    name: str = ""
    metric: str = "accuracy"
    num_labels: int = 2
    data_root: str = ""  # a local data folder, for datasets that are not on the hub (DTD)


@dataclass
class ExperimentConfig:
    adapter: AdapterConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model_name: str = ""
    model_size: str = "base"
    output_dir: str = "runs"
    sources: dict[str, str] = field(default_factory=dict)  # dotted key -> the level that set it

    @property
    def adapter_type(self) -> str:
        return self.adapter.kind


@dataclass
class Presets:
    """A runner's layered presets: dotted key -> value dicts per level (``defaults``: the runner's
    own defaults, applied right after the dataclass defaults)."""

    defaults: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, dict[str, Any]] = field(default_factory=dict)
    task: dict[str, dict[str, Any]] = field(default_factory=dict)
    size: dict[str, dict[str, Any]] = field(default_factory=dict)
    size_task: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    size_adapter: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # e.g. d per size
    adapter_task: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # with the task level
    size_adapter_task: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)


# The reference's spellings of a few keys: they name the same fields here.
ALIASES = {
    "adapter.target_modules": "adapter.targets",
    "task.lr": "training.lr",
    "task.head_lr": "training.head_lr",
    "task.epochs": "training.epochs",
    "task.batch_size": "training.batch_size",
}


class OverrideError(ValueError):
    """A preset or command-line override names an unknown key or gives a bad value."""


# -------------------------------------------------------------------------------------- resolution


def resolve(
    presets: Presets,
    *,
    adapter_type: str,
    task: str,
    model_size: str = "base",
    overrides: list[str] | None = None,
) -> ExperimentConfig:
    """The config for one run: defaults, then each preset level, then ``overrides`` (key value ...)."""
    if adapter_type not in ADAPTERS:
        raise OverrideError(f"--adapter_type {adapter_type!r} is unknown; choose one of {sorted(ADAPTERS)}.")
    if task not in presets.task:
        raise OverrideError(f"task {task!r} is unknown; choose one of {sorted(presets.task)}.")
    if presets.size and model_size not in presets.size:
        raise OverrideError(f"--model_size {model_size!r} is unknown; choose one of {sorted(presets.size)}.")
    cfg = ExperimentConfig(adapter=ADAPTERS[adapter_type](), model_size=model_size)
    cfg.task.name = task
    levels = [
        ("runner defaults", presets.defaults),
        ("adapter preset", presets.adapter.get(adapter_type, {})),
        ("task overrides", presets.task[task]),
        ("task overrides", presets.adapter_task.get((adapter_type, task), {})),
        ("model-size preset", presets.size.get(model_size, {})),
        ("model-size preset", presets.size_task.get((model_size, task), {})),
        ("model-size preset", presets.size_adapter.get((model_size, adapter_type), {})),
        ("model-size preset", presets.size_adapter_task.get((model_size, adapter_type, task), {})),
        ("command line", dict(parse_pairs(overrides or []))),
    ]
    for level, values in levels:
        for key, value in values.items():
            key = ALIASES.get(key, key)
            field_name = key.removeprefix("adapter.")
            if level == "runner defaults" and field_name != key and not hasattr(cfg.adapter, field_name):
                continue  # a runner's default for adapters that have the field (full has no targets)
            set_value(cfg, key, value, from_text=level == "command line")
            cfg.sources[key] = level
    return cfg


def parse_pairs(tokens: list[str]) -> list[tuple[str, str]]:
    """``["a.b", "1", "c", "x"]`` -> ``[("a.b", "1"), ("c", "x")]``."""
    if len(tokens) % 2:
        raise OverrideError(
            f"overrides come in 'key value' pairs; got an odd count {tokens}. "
            "Example: adapter.d 16384 training.lr 0.001"
        )
    return list(zip(tokens[::2], tokens[1::2], strict=True))


def _fields(obj) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj) if f.name != "sources"}


def _keys(cfg: ExperimentConfig) -> list[str]:
    out = []
    for name in _fields(cfg):
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            out += [f"{name}.{sub}" for sub in _fields(value)]
        else:
            out.append(name)
    return out


def set_value(cfg: ExperimentConfig, key: str, value: Any, *, from_text: bool = False) -> None:
    """Set a dotted key, converting text (command line) or checking the type (presets)."""
    parts = key.split(".")
    target = cfg
    for part in parts[:-1]:
        target = getattr(target, part, None)
        if not dataclasses.is_dataclass(target):
            target = None
            break
    hints = _fields(target) if target is not None else {}
    name = parts[-1]
    if name not in hints or (len(parts) == 1 and dataclasses.is_dataclass(getattr(cfg, name, None))):
        close = difflib.get_close_matches(key, _keys(cfg), n=3)
        hint = f"did you mean {close}?" if close else f"valid keys: {_keys(cfg)}"
        raise OverrideError(f"unknown config key {key!r} for adapter type {cfg.adapter.kind!r}; {hint}")
    tp = hints[name]
    try:
        converted = _convert(value, tp) if from_text else _check(value, tp)
    except (TypeError, ValueError) as err:
        raise OverrideError(f"{key} = {value!r}: expected {_type_name(tp)} ({err}).") from None
    setattr(target, name, converted)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _optional(tp):
    """``X | None`` -> X, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _convert(text: str, tp):
    inner = _optional(tp)
    if inner is not None:
        return None if text.lower() in ("none", "null") else _convert(text, inner)
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError("use True or False")
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [_convert(part.strip(), item) for part in text.split(",") if part.strip()]
    raise TypeError(f"no text conversion for {tp}")


def _check(value, tp):
    inner = _optional(tp)
    if inner is not None:
        return None if value is None else _check(value, inner)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise TypeError(f"got {type(value).__name__}")
        return [_check(v, item) for v in value]
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise TypeError(f"got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------ saving


def to_dict(cfg: ExperimentConfig) -> dict:
    out = dataclasses.asdict(cfg)
    out["adapter_type"] = cfg.adapter.kind
    return out


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config (with the level that set each key) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    return path
