"""The model-level verbs: apply, merge, remove, and the contexts and accessors around them.

Every verb validates everything first and only then changes the model, so a call that raises
leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import numbers
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import get_args

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _delta, fastfood
from .assignment import compact, generator_ids, signed_magnitude
from .errors import ConfigError, StateError, TargetError
from .parametrization import (
    Assignment,
    Backend,
    Bias,
    GPartConfig,
    GPartParametrization,
    GPartState,
    Pack,
    Projection,
    Scope,
)
from .partition import group_scales, hash_base
from .targets import (
    BLOCK_CONTAINERS,
    Layout,
    Segment,
    Target,
    TargetSpec,
    name_matches,
    packs,
    resolve,
    segments,
    suggest,
)

__all__ = [
    "Summary",
    "adapters",
    "apply",
    "cached",
    "disabled",
    "merge",
    "remove",
    "set_active",
    "summary",
    "theta",
]

#: Attribute of the root model that holds the default adapter's :class:`GPartState`; an adapter
#: named ``x`` lives at ``gpart_x``.
STATE_ATTR = "gpart"
#: The name of the adapter that every verb uses unless given ``name=``.
DEFAULT = "default"
#: ``backend="auto"`` compiles the delta kernels from this many target entries on, or from
#: :data:`AUTO_COMPILE_SIZE_WARM` on when the compile cache already holds them (see
#: :func:`gpart._delta.compile_cache_warm`). Below, a run of a few hundred steps spends more on
#: compiling (~9 s with a cold cache, ~2.5 s with a warm one, on 2 CPU cores) than the compiled
#: kernels save (``benchmarks/bench_auto.py``).
AUTO_COMPILE_SIZE = 1 << 22
AUTO_COMPILE_SIZE_WARM = 1 << 20
_BIAS_MODES, _SCOPES = get_args(Bias), get_args(Scope)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _names(value: object, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{what} must be a list of module/parameter names, got {value!r}.")
    if "" in items:  # "" is the root module's name: it would match the whole model
        raise ConfigError(
            f"{what}={list(items)!r} holds an empty name, which matches the root module (the whole "
            "model). Name the submodules instead, e.g. ['classifier']."
        )
    return tuple(items)


_F32_MAX = float(torch.finfo(torch.float32).max)


def make_config(
    *,
    d: object,
    seed: object,
    isometric: object,
    bias: object,
    dropout: object,
    init_bound: object,
    trainable: object,
    scope: object = "global",
    assignment: object = "hash",
    projection: object = "partition",
    block_containers: object = (),
) -> GPartConfig:
    if not _is_int(d) or int(d) < 1:
        raise ConfigError(
            f"d={d!r} ({type(d).__name__}): d is the number of trainable parameters and must be a "
            "positive int (bools and floats are rejected). Pass e.g. d=23040."
        )
    if not _is_int(seed):
        raise ConfigError(
            f"seed={seed!r} ({type(seed).__name__}): the partition seed must be an int (any size, "
            "negative allowed). Pass e.g. seed=0."
        )
    if not isinstance(isometric, bool):
        raise ConfigError(f"isometric={isometric!r}: must be True or False.")
    if bias not in _BIAS_MODES:
        raise ConfigError(
            f"bias={bias!r}: unknown bias mode; use 'none' (weights only) or 'all' (each target "
            "module's bias joins the index space after its weight)."
        )
    # The mask compares against p rounded to 2**-24 (see gpart.partition.dropout_keep): p must round
    # below 1 there too, or nothing would be kept.
    if not _is_real(dropout) or not 0.0 <= float(dropout) < 1.0 or round(float(dropout) * 2**24) >= 2**24:
        raise ConfigError(
            f"dropout={dropout!r}: the delta dropout probability must be a number in [0, 1) "
            "(at most 1 - 2**-24). Use 0.0 to disable it."
        )
    if not _is_real(init_bound) or not (0.0 <= float(init_bound) <= _F32_MAX):
        raise ConfigError(
            f"init_bound={init_bound!r}: theta (float32) starts uniform in [-b, b], so b must be a "
            "number >= 0 that float32 can hold (0 = start exactly at the pretrained weights)."
        )
    if scope not in _SCOPES:
        raise ConfigError(
            f"scope={scope!r}: unknown partition scope; use 'global' (one partition over all targets) "
            "or 'block' (one per transformer block, d split evenly across the blocks)."
        )
    if assignment not in get_args(Assignment):
        raise ConfigError(
            f"assignment={assignment!r}: unknown group assignment; use 'hash' (the default: ids "
            "hashed from the seed, nothing stored), 'generator' (drawn with a seeded torch "
            "generator) or 'signed_magnitude' (bins of W0 by sign and magnitude)."
        )
    if projection not in get_args(Projection):
        raise ConfigError(
            f"projection={projection!r}: unknown projection; use 'partition' (GPart) or 'fastfood' "
            "(the dense structured baseline of the intrinsic-dimension method)."
        )
    if projection == "fastfood" and (scope != "global" or assignment != "hash"):
        raise ConfigError(
            f"projection='fastfood' with scope={scope!r}, assignment={assignment!r}: Fastfood is one "
            "dense map over all targets, with no groups to assign. Use scope='global', assignment='hash'."
        )
    if projection == "fastfood" and not isometric and int(d) < 2:
        raise ConfigError("projection='fastfood' with isometric=False needs d >= 2 (its gains span a range).")
    containers = (block_containers,) if isinstance(block_containers, str) else block_containers
    if not isinstance(containers, Sequence) or not all(
        isinstance(c, str) and c and "." not in c for c in containers
    ):
        raise ConfigError(
            f"block_containers={block_containers!r}: the names of the containers whose numbered "
            "children are blocks, one name component each (no dots), e.g. ['layers'] or ['h']."
        )
    if containers and scope != "block":
        raise ConfigError(
            f"block_containers={list(containers)!r} with scope={scope!r}: block containers only "
            "locate the blocks of scope='block'. Drop them, or pass scope='block'."
        )
    drawn = assignment == "generator" or projection == "fastfood"
    if drawn and not -(1 << 63) <= int(seed) < 1 << 64:
        raise ConfigError(
            f"seed={seed}: assignment='generator' and projection='fastfood' seed a torch.Generator, "
            "which takes seeds in [-2**63, 2**64). Pass a seed in that range."
        )
    return GPartConfig(
        projection=str(projection),
        assignment=str(assignment),
        scope=str(scope),
        d=int(d),
        seed=int(seed),
        isometric=isometric,
        bias=str(bias),
        dropout=float(dropout),
        init_bound=float(init_bound),
        trainable=_names(trainable, "trainable"),
        block_containers=tuple(dict.fromkeys(containers)),
    )


def _segments(layout: Layout, config: GPartConfig):
    """Each target's segment of the partition (see :func:`gpart.targets.segments`)."""
    containers = config.block_containers or BLOCK_CONTAINERS
    return segments(layout, d=config.d, seed=config.seed, scope=config.scope, containers=containers)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"name={name!r}: an adapter name is a Python identifier of at most 64 characters "
            "(letters, digits, '_'), e.g. 'task_a'."
        )
    return name


def state_attr(name: str) -> str:
    """The root attribute holding adapter ``name``: ``gpart`` for the default one, ``gpart_<name>``."""
    return STATE_ATTR if name == DEFAULT else f"{STATE_ATTR}_{name}"


def adapter_states(model: nn.Module) -> dict[str, GPartState]:
    """Every adapter of ``model`` by name, in the order they were applied."""
    found = model._modules.items() if isinstance(model, nn.Module) else ()
    return {m.name: m for a, m in found if isinstance(m, GPartState) and a == state_attr(m.name)}


def trainable_outside_adapters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's trainable parameters that no adapter owns (e.g. a head), by name: what an
    adapter file saves beside theta (never another adapter's theta)."""
    own = {state_attr(name) for name in adapter_states(model)}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] not in own}


def _require_adapters(model: nn.Module) -> dict[str, GPartState]:
    """Every adapter of ``model``; a :class:`StateError` (as :func:`adapter_state`) if it has none."""
    states = adapter_states(model)
    if not states:
        adapter_state(model)  # raises the plain-model error
    return states


def find_state(model: nn.Module, name: str = DEFAULT) -> GPartState | None:
    return adapter_states(model).get(name)


def adapter_state(model: nn.Module, name: object = DEFAULT) -> GPartState:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    name = check_name(name)
    states = adapter_states(model)
    if name not in states:
        if states:
            raise StateError(
                f"{type(model).__name__} has no gpart adapter named {name!r}; its adapters are "
                f"{list(states)}. Pass name= one of them."
            )
        raise StateError(
            f"{type(model).__name__} has no gpart adapter (no '{STATE_ATTR}' state module); "
            "call gpart.apply(model, d=..., seed=...) or gpart.load(model, path) first."
        )
    return states[name]


@dataclass(frozen=True)
class _Host:
    """What the model was like before gpart touched it, shared by all its adapters.

    ``flags``: every parameter's ``requires_grad`` before the first adapter (restored when the last
    one goes); ``order``: a module's parameter order before gpart first parametrized one of its
    tensors (parametrize re-registers a restored tensor last); ``classes``: the class of a module
    that carried another parametrization before gpart (torch restores a plain module's class
    itself; these get their very class object back). Replaced, never mutated, so that a verb's
    transaction restores it with the states' attributes.
    """

    flags: dict[str, bool]
    order: dict[str, list[str]]
    classes: dict[str, type]


def _gpart_tensors(module: nn.Module) -> list[str]:
    """The tensors of ``module`` that carry a gpart parametrization (of any adapter)."""
    if not parametrize.is_parametrized(module):
        return []
    return [
        n
        for n, plist in module.parametrizations.items()
        if any(isinstance(p, GPartParametrization) for p in plist)
    ]


def plan_adapter(
    model: nn.Module,
    config: GPartConfig,
    *,
    targets: TargetSpec | None,
    target_parameters: Sequence[str],
    exact: Sequence[str] | None = None,
    backend: str = "auto",
    scales: bool = True,
    name: str = DEFAULT,
) -> Plan:
    """All checks and all computation of ``apply``, without touching the model: the :class:`Plan`
    that :func:`install_adapter` carries out.

    ``scales=False`` stops at the layout (no pass over the index space: format conversion needs
    the layout alone, and hashing a 7B model's D entries takes minutes on a CPU).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    name = check_name(name)
    states = adapter_states(model)
    if name in states:
        again = "gpart.remove(model)" if name == DEFAULT else f"gpart.remove(model, name={name!r})"
        raise StateError(
            f"gpart is already applied to this {type(model).__name__} as the adapter {name!r}. Pass "
            f"another name= to add a second adapter, or call {again} first."
        )
    if hasattr(model, state_attr(name)):
        raise StateError(
            f"{type(model).__name__} already has an attribute {state_attr(name)!r}; gpart stores the "
            f"adapter {name!r} there. Rename that attribute or pick another adapter name."
        )
    if not (targets is None or isinstance(targets, str) or callable(targets)):
        _names(targets, "targets")
    own = {state_attr(n) for n in states}
    module_names = [n for n, _ in model.named_modules() if n.split(".")[0] not in own]
    for wanted in config.trainable:
        if not any(name_matches(m, (wanted,)) for m in module_names):
            raise TargetError(
                f"trainable={list(config.trainable)!r}: {wanted!r} matches no module (exact name or "
                f"dotted suffix); {suggest([wanted], module_names)}."
            )
    trainable_modules = [m for m in module_names if name_matches(m, config.trainable)]
    host = next(iter(states.values())).host if states else None
    layout = resolve(
        model,
        targets=targets,
        target_parameters=_names(target_parameters, "target_parameters"),
        bias=config.bias,
        exclude=[*trainable_modules, *own],
        exact=exact,
        stacked={t.name for s in states.values() for t in s.layout.targets},
        orders=host.order if host is not None else {},
    )
    sharded = [t.name for t in layout.targets if callable(getattr(_w0(model, t), "full_tensor", None))]
    if sharded:
        raise StateError(
            f"target {sharded[0]!r} is already sharded (an FSDP2 DTensor); the partition runs over the "
            "whole tensors. Call gpart.apply before fully_shard."
        )
    parts = _segments(layout, config)
    if config.d > layout.size:
        raise ConfigError(
            f"d={config.d} exceeds D={layout.size}, the number of target entries; every group "
            f"needs at least one entry. Use d <= {layout.size} or select more targets."
        )
    plan = Plan(config, name, layout, parts, backend)
    if not scales:
        return plan
    first = _w0(model, layout.targets[0])
    device = torch.device("cpu") if first.device.type == "meta" else first.device
    backend = _resolve_backend(backend, layout, device)
    stored = _stored_ids(model, layout, parts, config)
    scale = _scales(layout, parts, config, stored, backend=backend, device=device)
    drawn = fastfood.draw(config.seed, config.d, layout.size) if config.projection == "fastfood" else None
    return replace(plan, backend=backend, ids=stored, scale=scale, fastfood=drawn)


@dataclass(frozen=True)
class Plan:
    """What :func:`plan_adapter` decided and computed for one adapter; :func:`install_adapter`
    only registers it. ``scale`` is None for a plan of the layout alone."""

    config: GPartConfig
    name: str
    layout: Layout
    segments: tuple[Segment, ...]  #: each target's place in its partition
    backend: str
    ids: list[torch.Tensor] | None = None  #: stored group ids per target (int32, CPU); None: hashed
    scale: torch.Tensor | None = None  #: per-group scales (Fastfood: its gains), on the targets' device
    fastfood: tuple[torch.Tensor, ...] | None = None  #: Fastfood's state: signs, Gaussians, permutations


def _scales(layout: Layout, parts, config: GPartConfig, stored, *, backend: str, device) -> torch.Tensor:
    """The per-group scales ``1/sqrt(n_j)`` (ones without isometry); the Fastfood gains instead."""
    if config.projection == "fastfood":  # no groups: the scales hold the gains (ones if isometric)
        scale = torch.ones(config.d) if config.isometric else fastfood.gains(config.seed, config.d)
        return scale.to(device)
    if stored is not None:
        counts = torch.zeros(config.d, dtype=torch.int64)
        for ids, part in zip(stored, parts, strict=True):
            counts[part.lo : part.hi] += torch.bincount(ids, minlength=part.hi - part.lo)
        return group_scales(counts.to(device), isometric=config.isometric)
    spaces: dict[tuple[int, int, int], int] = {}  # (seed, lo, hi) -> size of that index space
    for target, part in zip(layout.targets, parts, strict=True):
        key = (part.seed, part.lo, part.hi)
        spaces[key] = max(spaces.get(key, 0), part.start + target.numel)
    counts = torch.cat(
        [
            _delta.count_groups(size, d=hi - lo, seed=seed, backend=backend, device=device)
            for (seed, lo, hi), size in sorted(spaces.items(), key=lambda item: item[0][1])
        ]
    )
    return group_scales(counts, isometric=config.isometric)


#: The settings an adapter can change in place (:func:`plan_swap`): the partition is the
#: position hash, whose seed and d are runtime values of every kernel.
SWAPPABLE = ("d", "seed")


def plan_swap(model: nn.Module, state: GPartState, config: GPartConfig):
    """Checks and values to give the adapter ``state`` another seed and d in place (a hot swap).

    Returns ``(segments, scales, hash bases)``: everything :func:`swap_partition` writes. The group
    counts are recounted (one pass over the index space); nothing is registered again.
    """
    if state.config.projection != "partition" or state.config.assignment != "hash":
        raise StateError(
            f"adapter {state.name!r} uses projection={state.config.projection!r}, "
            f"assignment={state.config.assignment!r}; only the hashed partition takes another seed or d "
            "in place. Remove the adapter and load the file again."
        )
    if config.d != state.config.d and callable(getattr(state.theta, "full_tensor", None)):
        raise StateError(
            f"adapter {state.name!r} is sharded (FSDP2); theta cannot change length (d {state.config.d} -> "
            f"{config.d}) on a sharded model. Load it before fully_shard."
        )
    parts = _segments(state.layout, config)
    device = state.scale.device
    scale = _scales(state.layout, parts, config, None, backend=state.backend, device=device)
    bases = [torch.tensor(hash_base(part.seed, part.start), device=device) for part in parts]
    return parts, scale, bases


def swap_partition(state: GPartState, entries, config: GPartConfig, planned) -> None:
    """Write what :func:`plan_swap` computed: in place wherever the sizes allow (no tensor that a
    compiled graph holds is replaced when d is unchanged), so nothing recompiles. With another d,
    theta and the scales are new tensors."""
    parts, scale, bases = planned
    with torch.no_grad():
        if scale.numel() == state.scale.numel():
            state.scale.copy_(scale)
        else:  # a new theta: a graph still alive may hold the old one's gradient accumulator
            state.scale = scale
            state.theta = nn.Parameter(state.theta.new_zeros(config.d), state.theta.requires_grad)
        for (_, _, p), part, base in zip(entries, parts, bases, strict=True):
            p.segment, p.start = part, part.start
            p.hash_base.copy_(base)
    state.config = replace(state.config, d=config.d, seed=config.seed)


def _stored_ids(model: nn.Module, layout: Layout, parts, config: GPartConfig) -> list[torch.Tensor] | None:
    """Each target's group ids (int32, CPU) for the assignments that store them; None for the hash."""
    if config.assignment == "hash":
        return None
    spaces: dict[tuple[int, int], list[int]] = {}  # (seed, lo) -> the targets of that partition
    for i, part in enumerate(parts):
        spaces.setdefault((part.seed, part.lo), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0, dtype=torch.int32)] * len(parts)
    for (seed, lo), members in spaces.items():
        d = parts[members[0]].hi - lo
        if config.assignment == "generator":
            drawn = generator_ids([layout.targets[i].numel for i in members], d=d, seed=seed)
        else:
            tensors = [_w0(model, layout.targets[i]) for i in members]
            if any(t.device.type == "meta" for t in tensors):
                raise ConfigError(
                    "assignment='signed_magnitude' groups the pretrained weights by value; this model's "
                    "targets are on the meta device. Load the weights first."
                )
            ids = signed_magnitude(torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors]), d=d)
            drawn = ids.split([layout.targets[i].numel for i in members])
        for i, ids in zip(members, drawn, strict=True):
            out[i] = ids.to(torch.int32)  # d < 2**31: 4 bytes an entry while planning
    return out


def _w0(model: nn.Module, target: Target) -> torch.Tensor:
    """A target's pretrained tensor, also when adapters already parametrize it."""
    module = model.get_submodule(target.module_name)
    if parametrize.is_parametrized(module, target.param_name):
        return module.parametrizations[target.param_name].original
    return getattr(module, target.param_name)


def check_runtime(backend: object, recompute: object) -> None:
    if backend not in get_args(Backend):
        raise ConfigError(
            f"backend={backend!r}: unknown kernel; use 'auto' (compiled for large D when torch.compile "
            f"works here), or one of {list(get_args(Backend)[1:])}."
        )
    if not isinstance(recompute, bool):
        raise ConfigError(f"recompute={recompute!r}: must be True or False.")


def _resolve_backend(backend: str, layout: Layout, device: torch.device) -> str:
    if backend != "auto":
        return backend
    if layout.size < AUTO_COMPILE_SIZE_WARM:
        return "eager"
    big = layout.size >= AUTO_COMPILE_SIZE or _delta.compile_cache_warm(device)
    return "compiled" if big and _delta.compiled_available(device) else "eager"


def _target_modules(model: nn.Module, layout: Layout) -> list[nn.Module]:
    return list({id(m): m for m in (model.get_submodule(t.module_name) for t in layout.targets)}.values())


class _Transaction:
    """What gpart's verbs change on a model, recorded so that a failure midway can put it back.

    The verbs change module classes, the parameter, child and hook dicts of modules, attributes
    and ``requires_grad`` flags: all recorded here and restored in place (the same dict objects,
    so hook handles stay valid). Tensor values are not recorded: a verb computes every new value
    before its first change and copies values in only after its last step that can fail.
    """

    def __init__(self, model: nn.Module) -> None:
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.modules = [
            (
                m,
                type(m),
                dict(vars(m)),
                *(
                    (d, dict(d))
                    for d in (
                        m._parameters,
                        m._modules,
                        m._forward_pre_hooks,
                        m._forward_hooks,
                        m._forward_hooks_always_called,
                    )
                ),
            )
            for m in {id(m): m for m in model.modules()}.values()
        ]

    def restore(self) -> None:
        for module, cls, attrs, *dicts in self.modules:
            module.__class__ = cls
            for live, saved in dicts:
                live.clear()
                live.update(saved)
            for key in [k for k in vars(module) if k not in attrs]:
                delattr(module, key)
            vars(module).update(attrs)
        for p, flag in self.flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def atomic(model: nn.Module) -> Iterator[None]:
    """Run a change to ``model``; on any exception (out-of-memory included) undo it and re-raise."""
    transaction = _Transaction(model)
    try:
        yield
    except BaseException:
        transaction.restore()
        raise


def install_adapter(model: nn.Module, plan: Plan, *, freeze: bool, recompute: bool = True) -> nn.Module:
    """Carry out ``plan`` (atomically: on any failure the model is restored and the error re-raised).

    The new adapter becomes the only active one; on a tensor that other adapters parametrize
    already, its parametrization comes after theirs (adding its delta to their output).
    """
    config, layout, parts, stored, name = plan.config, plan.layout, plan.segments, plan.ids, plan.name
    state = GPartState(config, layout, plan.scale, backend=plan.backend, recompute=recompute, name=name)
    if plan.fastfood is not None:
        state.set_fastfood(*plan.fastfood, device=plan.scale.device)
    others = adapter_states(model)
    host = next(iter(others.values())).host if others else None
    modules = {t.module_name: model.get_submodule(t.module_name) for t in layout.targets}
    fresh = {n: m for n, m in modules.items() if not _gpart_tensors(m)}  # no adapter on them yet
    state.host = _Host(
        flags=host.flags if host else {n: p.requires_grad for n, p in model.named_parameters()},
        order={**(host.order if host else {}), **{n: list(m._parameters) for n, m in fresh.items()}},
        classes={
            **(host.classes if host else {}),
            **{n: type(m) for n, m in fresh.items() if parametrize.is_parametrized(m)},
        },
    )
    trainable = [m for n, m in model.named_modules() if name_matches(n, config.trainable)]
    with atomic(model):
        for module in modules.values():
            # torch would add gpart's properties to a class that copies of the model share (one
            # another parametrization made, or the one of another copy): a private class instead.
            if parametrize.is_parametrized(module):
                _own_class(module)
        for i, (target, part) in enumerate(zip(layout.targets, parts, strict=True)):
            module = modules[target.module_name]
            w0 = _w0(model, target)
            w0.requires_grad_(False)
            ids = None if stored is None else compact(stored[i], part.hi - part.lo).to(w0.device)
            parametrize.register_parametrization(
                module, target.param_name, GPartParametrization(state, target, part, ids), unsafe=True
            )
        setattr(model, state_attr(name), state)
        for other in others.values():
            other.host = state.host
            other.active = False
            other.theta.requires_grad_(False)
        if state.recipes is not None:
            for module in _target_modules(model, layout):
                module.register_forward_pre_hook(state.recipes.enter)
                module.register_forward_hook(state.recipes.exit, always_call=True)
        plain = stored is None and config.projection == "partition"
        for owner_name, members in packs(model, layout, parts) if plain else []:
            plists = [
                modules[layout.targets[i].module_name].parametrizations[layout.targets[i].param_name]
                for i in members
            ]
            if any(len(plist) > 1 for plist in plists):
                continue  # a pack reads W0 itself: not after another adapter's delta
            pack = Pack(state, plists)
            owner = model.get_submodule(owner_name)
            owner.register_forward_pre_hook(pack.open)
            owner.register_forward_hook(pack.close, always_call=True)
            state.packs.append((owner, pack))
        if freeze:
            for pname, p in model.named_parameters():
                if pname != f"{state_attr(name)}.theta":
                    p.requires_grad_(False)
        for module in trainable:
            module.requires_grad_(True)
    return model


def _remove_hooks(module: nn.Module, owner: object) -> None:
    """Drop the forward hooks that are bound methods of ``owner`` (gpart's recompute hooks)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is owner]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class.

    ``copy.deepcopy`` of a parametrized module shares torch's generated ``Parametrized*`` class
    with the original, and ``remove_parametrizations`` deletes the tensor's property from that
    class: un-parametrizing a copy would break the original (``merge(deepcopy(model))``).
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _uninstall(
    model: nn.Module, state: GPartState, entries: list[tuple[nn.Module, str, GPartParametrization]]
) -> None:
    """Undo :func:`install_adapter` of one adapter (the caller makes it atomic); the others stay.

    A module no adapter parametrizes any more gets back its parameter order and, if it carried
    another parametrization before gpart, its class object. When the last adapter goes, every
    ``requires_grad`` flag is restored as it was before the first.
    """
    if state.recipes is not None:
        for module, _, _ in entries:
            _remove_hooks(module, state.recipes)
    for owner, pack in state.packs:
        _remove_hooks(owner, pack)
    for module in {id(m): m for m, _, _ in entries}.values():
        _own_class(module)
    for module, pname, p in reversed(entries):
        plist = module.parametrizations[pname]
        if len(plist) > 1:  # other adapters on this tensor: drop this one from the chain
            del plist[next(i for i, q in enumerate(plist) if q is p)]
        else:
            parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
    host = state.host
    freed = [
        name
        for name in dict.fromkeys(t.module_name for t in state.layout.targets)
        if not _gpart_tensors(model.get_submodule(name))
    ]
    for name in freed:
        module = model.get_submodule(name)
        if name in host.classes:
            module.__class__ = host.classes[name]
        params = module._parameters
        params.update({k: params.pop(k) for k in host.order.get(name, ()) if k in params})
    delattr(model, state_attr(state.name))
    rest = adapter_states(model)
    if rest:
        kept = _Host(
            flags=host.flags,
            order={k: v for k, v in host.order.items() if k not in freed},
            classes={k: v for k, v in host.classes.items() if k not in freed},
        )
        for other in rest.values():
            other.host = kept
    else:
        for name, p in model.named_parameters():
            if name in host.flags:
                p.requires_grad_(host.flags[name])
    state.packs.clear()


def apply(
    model: nn.Module,
    *,
    d: int,
    seed: int,
    targets: TargetSpec = "all-linear",
    target_parameters: Sequence[str] = (),
    bias: Bias = "none",
    isometric: bool = True,
    dropout: float = 0.0,
    init_bound: float = 0.0,
    trainable: Sequence[str] = (),
    freeze: bool = True,
    backend: Backend = "auto",
    recompute: bool = True,
    scope: Scope = "global",
    assignment: Assignment = "hash",
    projection: Projection = "partition",
    block_containers: Sequence[str] = (),
    name: str = DEFAULT,
) -> nn.Module:
    """Make ``model`` GPart-trainable in place: one trainable vector ``theta`` of length ``d``.

    All target entries (D of them, see :mod:`gpart.targets`) are split into ``d`` groups by a
    seeded hash of their global position; entry ``i`` becomes ``W0[i] + theta[g(i)] / sqrt(n_g)``.
    ``theta`` (zeros, fp32) is registered once as ``model.gpart.theta``.

    A model can carry several named adapters (``name=``, each with its own d, seed, targets and
    settings): a new one is added after the others and becomes the only active one (the others
    stay, inactive and frozen; see :func:`set_active`).

    Args:
        d: number of trainable parameters (1 <= d <= D).
        seed: partition seed (any int).
        targets: module selection: list of names (exact or dotted suffix), a regex string,
            ``"all-linear"`` (default) or a callable ``fn(name, module) -> bool``.
        target_parameters: extra tensors by qualified parameter name (exact or dotted suffix),
            e.g. 3-D expert weights or an embedding matrix.
        bias: ``"none"`` or ``"all"`` (target modules' biases join the index space).
        isometric: scale by ``1/sqrt(n_j)`` so that ``P^T P = I`` (default) or not (ablation).
        dropout: inverted dropout on each weight's delta during training (never on biases).
        init_bound: start theta uniform in ``[-b, b]`` instead of zeros.
        trainable: modules left fully trainable (e.g. a classification head), never targets.
        freeze: freeze every other parameter of the model (default True).
        backend: delta kernel: ``"eager"``, ``"compiled"`` (torch.compile, one fused pass) or
            ``"auto"`` (compiled when compilation works here and D >= 2**22, or D >= 2**20 with
            a warm compile cache). Same bits either way.
        recompute: rebuild ``W0 + delta`` in backward instead of keeping it alive from forward
            (saves D values of memory per step; costs one more delta pass).
        scope: ``"global"`` (default): one partition over all targets. ``"block"``: one per
            transformer block (the authors' ``partition_scope="transformer_block"``): d is split
            evenly over the numbered blocks holding targets (``layers.3``, ``h.0``, ..., natural
            order; the first ``d % blocks`` get one more), block k partitioned alone with seed
            ``seed + k``, owning its own slice of theta.
        assignment: how entries get their group. ``"hash"`` (default): a seeded hash of the
            position, nothing stored. ``"generator"``: drawn with a seeded ``torch.Generator``
            (the reference's materialized backend). ``"signed_magnitude"``: bins of W0 by sign
            and magnitude (seed unused). Both store the ids (2 bytes per entry for d < 32,767,
            else 4; see :mod:`gpart.assignment`).
        projection: ``"partition"`` (GPart, default) or ``"fastfood"``: the dense structured
            projection of the intrinsic-dimension baseline (:mod:`gpart.fastfood`); global scope,
            hash assignment; ``isometric=False`` adds its anisotropic gains.
        block_containers: with ``scope="block"``, the names of the containers whose numbered
            children are blocks (the reference's ``layers_pattern``); default ``layers``,
            ``layer``, ``h``, ``block``, ``blocks``.
        name: the adapter's name (a Python identifier); ``"default"`` lives at ``model.gpart``,
            any other at ``model.gpart_<name>``.

    Returns:
        The same ``model``.

    >>> import torch, gpart
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> _ = gpart.apply(model, d=16, seed=0, targets=["0"], trainable=["2"])
    >>> [n for n, p in model.named_parameters() if p.requires_grad]
    ['2.weight', '2.bias', 'gpart.theta']
    """
    config = make_config(
        d=d,
        seed=seed,
        isometric=isometric,
        bias=bias,
        dropout=dropout,
        init_bound=init_bound,
        trainable=trainable,
        scope=scope,
        assignment=assignment,
        projection=projection,
        block_containers=block_containers,
    )
    if not isinstance(freeze, bool):
        raise ConfigError(f"freeze={freeze!r}: must be True or False.")
    check_runtime(backend, recompute)
    plan = plan_adapter(
        model, config, targets=targets, target_parameters=target_parameters, backend=backend, name=name
    )
    install_adapter(model, plan, freeze=freeze, recompute=recompute)
    if config.init_bound > 0:
        with torch.no_grad():
            adapter_state(model, name).theta.uniform_(-config.init_bound, config.init_bound)
    return model


def installed_targets(
    model: nn.Module, state: GPartState
) -> list[tuple[nn.Module, str, GPartParametrization]]:
    """Every (module, tensor name, parametrization) gpart installed; checks nothing is missing."""
    out = []
    for target in state.layout.targets:
        try:
            module = model.get_submodule(target.module_name)
            plist = module.parametrizations[target.param_name]
        except (AttributeError, KeyError) as err:
            raise StateError(
                f"target {target.name!r} lost its gpart parametrization ({err}); the model was "
                "changed behind gpart's back. Rebuild it and apply again."
            ) from None
        found = [p for p in plist if isinstance(p, GPartParametrization) and p.state is state]
        if not all(isinstance(p, GPartParametrization) for p in plist) or not found:
            raise StateError(
                f"target {target.name!r} carries parametrizations {[type(p).__name__ for p in plist]}; "
                "expected gpart's alone. Remove the others first."
            )
        out.append((module, target.param_name, found[0]))
    return out


def merge(model: nn.Module, *, name: str = DEFAULT) -> nn.Module:
    """Bake the adapter's delta into the weights and drop the adapter: with no other adapter, the
    result is a plain model.

    The target Parameters keep their identity (now holding ``W0 + delta``); ``theta`` and the
    parametrizations are gone; every parameter's ``requires_grad`` is as before ``apply``.
    Dropout is never applied when merging. Every merged weight is computed before the model
    changes, so a failure (out of memory included) leaves the model as it was; the price is
    memory for one more copy of the target weights while ``merge`` runs.

    With several adapters, ``name`` picks the one merged (active or not); the others stay and
    now add their deltas to the merged weights (an ulp of rounding may differ from before: float
    addition is not associative); flags stay as they are until the last adapter goes.

    >>> import torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0, init_bound=0.1)
    >>> y = model(torch.ones(1, 4))
    >>> torch.equal(gpart.merge(model)(torch.ones(1, 4)), y)
    True
    """
    state = adapter_state(model, name)
    entries = installed_targets(model, state)
    sharded = [n for n, p in model.named_parameters() if callable(getattr(p, "full_tensor", None))]
    if sharded:
        raise StateError(
            f"merge on a sharded model (FSDP2 DTensor parameters, e.g. {sharded[0]!r}) is not "
            "supported: each shard would need its own offsets into the index space. Save the adapter "
            "(gpart.save gathers theta), then merge it into an unsharded copy of the base model "
            "(gpart.load + gpart.merge), or merge before sharding."
        )
    with torch.no_grad():  # every value first (what can run out of memory), the model unchanged
        originals = [module.parametrizations[pname].original for module, pname, _ in entries]
        merged = [p.effective(w0, dropout=0.0) for w0, (_, _, p) in zip(originals, entries, strict=True)]
        with atomic(model):
            _uninstall(model, state, entries)
        for original, value in zip(originals, merged, strict=True):  # no allocation: same shape, dtype
            original.copy_(value)
    return model


def remove(model: nn.Module, *, name: str = DEFAULT) -> nn.Module:
    """Undo ``apply`` exactly: original tensors (same Parameter objects), flags, no ``theta``.

    With several adapters, ``name`` picks the one removed; the others stay as they are, and the
    flags as before the first ``apply`` come back with the last ``remove``.

    >>> import torch, gpart
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> w = model[0].weight
    >>> gpart.remove(gpart.apply(model, d=3, seed=0))[0].weight is w
    True
    """
    state = adapter_state(model, name)
    entries = installed_targets(model, state)
    with atomic(model):
        _uninstall(model, state, entries)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes with its original weights (delta switched off).

    >>> import torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0, init_bound=1.0)
    >>> with gpart.disabled(model):
    ...     torch.equal(model[0].weight, model[0].parametrizations.weight.original)
    True
    """
    before = {state: state.enabled for state in _require_adapters(model).values()}
    for state in before:
        state.enabled = False
    try:
        yield model
    finally:
        for state, enabled in before.items():
            state.enabled = enabled


@contextlib.contextmanager
def cached(model: nn.Module) -> Iterator[nn.Module]:
    """Compute every target's ``W0 + delta`` once for all forward passes inside the block.

    For inference and generation: without it each forward (each generated token) rebuilds the
    deltas. Leave the block before changing ``theta``.

    >>> import torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0)
    >>> with torch.no_grad(), gpart.cached(model):
    ...     model[0].weight is model[0].weight
    True
    """
    _require_adapters(model)
    with parametrize.cached():
        yield model


def theta(model: nn.Module, name: str = DEFAULT) -> nn.Parameter:
    """The trainable vector (fp32, length d) of the adapter ``name`` of a gpart model.

    >>> import torch, gpart
    >>> gpart.theta(gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0)).shape
    torch.Size([3])
    """
    return adapter_state(model, name).theta


def adapters(model: nn.Module) -> dict[str, bool]:
    """The adapters of ``model`` in the order applied, each with whether it is active.

    >>> import torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0)
    >>> gpart.adapters(gpart.apply(model, d=5, seed=1, name="b"))
    {'default': False, 'b': True}
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    return {name: state.active for name, state in adapter_states(model).items()}


def set_active(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Choose the adapters that compute: one name, several (their deltas add up), or none (``[]``).

    Nothing is registered or recomputed: each adapter's parametrizations stay in place and an
    inactive one passes its input through. The active adapters' ``theta`` require grad, the
    inactive ones' do not (as PEFT's ``set_adapter``), so an optimizer over all thetas trains
    the active ones only. Under ``torch.compile`` each active set compiles once (the flags are
    guarded); switching between sets seen before does not recompile.

    >>> import torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0, init_bound=1.0)
    >>> _ = gpart.apply(model, d=5, seed=1, name="b", init_bound=1.0)
    >>> _ = gpart.set_active(model, ["default", "b"])
    >>> gpart.adapters(model)
    {'default': True, 'b': True}
    """
    states = adapter_states(model) if isinstance(model, nn.Module) else None
    if states is None:
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    chosen = (names,) if isinstance(names, str) else names
    if not isinstance(chosen, Sequence) or not all(isinstance(n, str) and n for n in chosen):
        raise ConfigError(
            f"set_active: names={names!r} must be an adapter name or a list of them (non-empty "
            "strings; [] for none), e.g. ['task_a', 'task_b']."
        )
    unknown = [n for n in chosen if n not in states]
    if unknown:
        raise StateError(
            f"set_active: no adapter named {unknown}; this {type(model).__name__} has {list(states)}. "
            "Pass names among those ([] for none)."
        )
    for name, state in states.items():
        state.active = name in chosen
        state.theta.requires_grad_(state.active)
    return model


@dataclass(frozen=True)
class Summary:
    """Trainable-parameter counts of a gpart model, as returned by :func:`summary`.

    >>> import torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), d=3, seed=0,
    ...                     targets=["0"], trainable=["1"])
    >>> s = gpart.summary(model)
    >>> (s.theta, s.other_trainable, s.trainable, s.total)
    (3, 10, 13, 33)
    """

    theta: int
    other_trainable: int
    total: int

    @property
    def trainable(self) -> int:
        return self.theta + self.other_trainable

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"theta: {self.theta:,} | other trainable: {self.other_trainable:,} | "
            f"trainable: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"
        )


def summary(model: nn.Module, *, name: str = DEFAULT) -> Summary:
    """Counts of theta, other trainable parameters (e.g. a head) and all parameters.

    >>> import torch, gpart
    >>> model = gpart.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), d=3, seed=0)
    >>> print(gpart.summary(model))
    theta: 3 | other trainable: 0 | trainable: 3 of 23 (13.0435%)
    """
    theta_param = adapter_state(model, name).theta
    other = sum(p.numel() for p in model.parameters() if p.requires_grad and p is not theta_param)
    total = sum(p.numel() for p in model.parameters())
    return Summary(theta=theta_param.numel(), other_trainable=other, total=total)
