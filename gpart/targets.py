"""Which tensors gpart trains, and where each one sits in the global index space.

Selection follows PEFT's conventions so existing configs carry over:

* a list of names: a module matches if its qualified name equals an entry or ends with
  ``"." + entry`` (``["query", "value"]`` matches ``encoder.layer.0.attention.self.query``);
* a single string: a regular expression that must match the whole qualified name;
* ``"all-linear"``: every ``nn.Linear`` (and transformers' GPT-2 ``Conv1D``) except the output
  head (``model.get_output_embeddings()``) and modules kept trainable;
* a callable ``fn(name, module) -> bool``.

A matched module contributes its ``weight`` (and its ``bias`` in ``bias="all"`` mode). Tensors
that are not a module's weight (3-D expert weights, a custom module's raw parameter) are named in
``target_parameters`` with the same exact-or-dotted-suffix rule, against the parameter's
qualified name.

Canonical order, which fixes the partition: modules in ``model.named_modules()`` order; within a
module ``weight``, then ``bias``, then other parameters in registration order; each tensor
flattened row-major as stored.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import TargetError

__all__ = [
    "BLOCK_CONTAINERS",
    "PACK_LIMIT",
    "PACK_TARGET",
    "Layout",
    "Segment",
    "Target",
    "TargetSpec",
    "block_of",
    "natural_key",
    "packs",
    "segments",
]

TargetSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class Target:
    """One target tensor and its interval ``[offset, offset + numel)`` of the global index space."""

    name: str  #: qualified parameter name in the unmodified model, e.g. ``layers.0.query.weight``
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def module_name(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def param_name(self) -> str:
        return self.name.rpartition(".")[2]


@dataclass(frozen=True)
class Layout:
    """The ordered targets; ``size`` is D, the length of the global index space."""

    targets: tuple[Target, ...]

    @property
    def size(self) -> int:
        last = self.targets[-1]
        return last.offset + last.numel

    def entries(self) -> list[tuple[str, list[int]]]:
        """``[(name, shape), ...]``: what a file records to verify the layout."""
        return [(t.name, list(t.shape)) for t in self.targets]


def linear_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (nn.Linear,)
    if "transformers" in sys.modules:  # only if the user already imported it: no hard dependency
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - very old/new transformers
            return types
        types += (Conv1D,)
    return types


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _module_predicate(
    model: nn.Module, spec: TargetSpec, exclude: set[str]
) -> Callable[[str, nn.Module], bool]:
    if callable(spec):
        return lambda name, module: bool(spec(name, module))
    if isinstance(spec, str) and spec == "all-linear":
        linear = linear_types()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return lambda name, module: isinstance(module, linear) and module is not head and name not in exclude
    if isinstance(spec, str):
        try:
            regex = re.compile(spec)
        except re.error as err:
            raise TargetError(
                f"targets={spec!r} is not a valid regular expression ({err}); a single string is a "
                f"regex matched against the whole module name. Fix it, or pass a list: [{spec!r}]."
            ) from None
        return lambda name, module: regex.fullmatch(name) is not None
    patterns = tuple(spec)
    return lambda name, module: name_matches(name, patterns)


def suggest(spec: TargetSpec, names: list[str]) -> str:
    """A few existing module names near what the user asked for."""
    short = sorted({n.rpartition(".")[2] for n in names if n})
    wanted = [spec] if isinstance(spec, str) else list(spec) if not callable(spec) else []
    close: list[str] = []
    for w in wanted:
        close += difflib.get_close_matches(str(w).rpartition(".")[2], short, n=5, cutoff=0.5)
    shown = list(dict.fromkeys(close)) or short[:8]
    text = f"nearby module names: {shown}"
    if isinstance(spec, str) and spec != "all-linear":
        text += (
            f"; a single string is a regex matched against the whole name: use [{spec!r}] to match by suffix"
        )
    return text


def _own_tensors(module: nn.Module) -> list[str]:
    """Names of a module's own parameters, parametrized ones included, in registration order."""
    names = [n for n, p in module._parameters.items() if p is not None]
    if parametrize.is_parametrized(module):
        names += [n for n in module.parametrizations if n not in names]
    return names


def _ordered(own: list[str], chosen: set[str]) -> list[str]:
    """Chosen tensor names of one module in canonical order: weight, bias, then the rest."""
    first = [n for n in ("weight", "bias") if n in chosen]
    return first + [n for n in own if n in chosen and n not in first]


def resolve(
    model: nn.Module,
    *,
    targets: TargetSpec | None,
    target_parameters: Sequence[str] = (),
    bias: str = "none",
    exclude: Sequence[str] = (),
    exact: Sequence[str] | None = None,
    stacked: Collection[str] = (),
    orders: Mapping[str, Sequence[str]] | None = None,
) -> Layout:
    """Select the target tensors of ``model`` and lay them out in canonical order. Changes nothing.

    ``exact`` (a list of qualified parameter names) replaces the selection rules; ``load`` uses it
    to rebuild a saved layout. ``stacked``: tensors that other gpart adapters already parametrize
    (a new adapter adds its delta after theirs), with ``orders`` the parameter order of their
    modules before gpart, so that the layout is the one of the plain model. Raises
    :class:`TargetError` on any unusable selection.
    """
    stacked, orders = set(stacked), orders or {}
    excluded = set(exclude)
    match_module = None if targets is None else _module_predicate(model, targets, excluded)
    wanted_exact = None if exact is None else set(exact)
    modules = [(n, m) for n, m in model.named_modules() if "parametrizations" not in n.split(".")]

    picked: list[tuple[str, nn.Module, str]] = []
    for mod_name, module in modules:
        if mod_name in excluded or any(mod_name.startswith(e + ".") for e in excluded):
            continue
        own = _own_tensors(module)
        if mod_name in orders:  # parametrize moved this module's adapted tensors last
            own = [n for n in orders[mod_name] if n in own] + [n for n in own if n not in orders[mod_name]]
        prefix = mod_name + "." if mod_name else ""
        chosen: set[str] = set()
        if wanted_exact is not None:
            chosen = {p for p in own if prefix + p in wanted_exact}
        else:
            if match_module is not None and "weight" in own and match_module(mod_name, module):
                chosen.add("weight")
                if bias == "all" and "bias" in own:
                    chosen.add("bias")
            chosen |= {p for p in own if name_matches(prefix + p, target_parameters)}
        picked += [(prefix + p, module, p) for p in _ordered(own, chosen)]

    all_names = [n for n, _ in modules]
    if not picked:
        asked = targets if targets is not None else list(target_parameters)
        raise TargetError(
            f"no target matched targets={targets!r}, target_parameters={list(target_parameters)!r} "
            f"in {type(model).__name__}; every GPart run needs at least one target tensor. "
            f"Fix the patterns ({suggest(asked, all_names)})."
        )
    if wanted_exact is not None:
        missing = wanted_exact - {name for name, _, _ in picked}
        if missing:
            raise TargetError(
                f"parameters {sorted(missing)} do not exist in {type(model).__name__}; the layout "
                "names tensors the model must have. Use the model architecture the adapter was made for."
            )

    _check_tensors(model, picked, stacked)
    out, offset = [], 0
    for name, module, pname in picked:
        shape = tuple(_tensor(module, pname, name in stacked).shape)
        out.append(Target(name=name, shape=shape, offset=offset))
        offset += out[-1].numel
    return Layout(tuple(out))


def _memory(t: torch.Tensor) -> tuple[tuple, int, int] | None:
    """``(storage key, first byte, end byte)`` of a tensor's elements; None without local storage."""
    if t.device.type == "meta" or t.numel() == 0 or callable(getattr(t, "full_tensor", None)):
        return None  # no storage (meta, empty) or not a local tensor (an FSDP2 shard)
    try:
        base = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None
    first = t.storage_offset() * t.element_size()
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1
    return (str(t.device), base), first, first + span * t.element_size()


def _aliases(named: list[tuple[str, torch.Tensor]]) -> dict[str, list[str]]:
    """For each name, the other names whose tensors share memory with it (ties by storage, which
    ``nn.Parameter(other.weight.data)`` makes without sharing the object)."""
    by_storage: dict[tuple, list[tuple[int, int, str]]] = {}
    for name, t in named:
        where = _memory(t)
        if where is not None:
            by_storage.setdefault(where[0], []).append((where[1], where[2], name))
    out: dict[str, list[str]] = {}
    for spans in by_storage.values():
        for a_first, a_end, a in spans:
            out[a] = [b for b_first, b_end, b in spans if b != a and b_first < a_end and a_first < b_end]
    return out


def _tensor(module: nn.Module, pname: str, stacked: bool) -> torch.Tensor:
    """The tensor itself; for one that adapters parametrize, the pretrained original (reading the
    attribute would compute ``W0 + delta``)."""
    return module.parametrizations[pname].original if stacked else getattr(module, pname)


def _check_tensors(model: nn.Module, picked: list[tuple[str, nn.Module, str]], stacked: set[str]) -> None:
    owners: dict[int, list[str]] = {}
    everything = list(model.named_parameters(remove_duplicate=False))
    everything += list(model.named_buffers(remove_duplicate=False))
    for name, p in everything:
        owners.setdefault(id(p), []).append(name)
    aliases = _aliases(everything)
    for name, module, pname in picked:
        tensor = _tensor(module, pname, name in stacked)
        if parametrize.is_parametrized(module, pname) and name not in stacked:
            raise TargetError(
                f"target {name!r} already has a parametrization ({type(module).__name__}); gpart "
                "cannot stack on another parametrization. Remove it first or exclude this module."
            )
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            dtype = getattr(tensor, "dtype", type(tensor).__name__)
            raise TargetError(
                f"target {name!r} has dtype {dtype}; gpart can only add a delta to floating-point "
                "tensors. Exclude it from the targets (quantized weights: dequantize first)."
            )
        names = owners.get(id(tensor), [name])
        names = names + [n for n in aliases.get(name, []) if n not in names]
        if len(names) > 1:
            raise TargetError(
                f"target {name!r} is shared with {[n for n in names if n != name] or names}; a tied "
                "tensor would receive its delta twice. Untie the weights or leave this tensor out "
                "of the targets."
            )


#: Names of the containers whose numbered children are transformer blocks (``scope="block"``),
#: as the authors' implementation resolves them: ``encoder.layer.7`` is a block, ``h.0`` too.
BLOCK_CONTAINERS = ("layers", "layer", "h", "block", "blocks")


def block_of(name: str, containers: Sequence[str] = BLOCK_CONTAINERS) -> str | None:
    """The transformer block holding module ``name``: the prefix through the first
    ``<container>.<number>`` pair, left to right; None when there is none.

    >>> block_of("roberta.encoder.layer.7.attention.self.query")
    'roberta.encoder.layer.7'
    >>> block_of("encoder.layer.3.block.2.q"), block_of("t.blocks.1.q", ["layers"])
    ('encoder.layer.3', None)
    """
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in containers and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return None


def natural_key(name: str) -> tuple:
    """Sort key that orders ``blocks.2`` before ``blocks.10`` (numbers by value, names by text)."""
    return tuple((0, int(c), "") if c.isdigit() else (1, 0, c) for c in name.split("."))


@dataclass(frozen=True)
class Segment:
    """Where one target's entries sit in their partition: which index space, which part of theta.

    The global scope has one index space (``seed``, positions ``offset``, all of theta); the block
    scope one per transformer block: block k has seed ``seed + k``, positions counted from the
    block's first entry, and its own slice ``theta[lo:hi]``.
    """

    seed: int
    start: int  #: the target's first position in its index space
    lo: int  #: theta[lo:hi] is the partition's share of theta
    hi: int


#: Targets of at most this many entries are packed (see :func:`packs`): below it a target's
#: fixed per-call cost outweighs its per-entry work (on a CPU a tensor op costs ~2 us before it
#: touches an entry; 65,536 entries of hashing cost ~100 us).
PACK_TARGET = 1 << 16
#: The most entries of one pack: bounds the weights a pack computes ahead of their use.
PACK_LIMIT = 1 << 20


def segments(
    layout: Layout, *, d: int, seed: int, scope: str, containers: Sequence[str] = BLOCK_CONTAINERS
) -> tuple[Segment, ...]:
    """Each target's :class:`Segment` for ``scope`` ``"global"`` or ``"block"``.

    Block scope, as the authors' implementation: the blocks holding targets in natural order;
    block k gets ``d // B`` coordinates, one more for the first ``d % B``; seed ``seed + k``. Raises
    :class:`TargetError` for a target outside every numbered block and for too small a ``d``.
    """
    if scope == "global":
        return tuple(Segment(seed, t.offset, 0, d) for t in layout.targets)
    keys = [block_of(t.module_name, containers) for t in layout.targets]
    outside = [t.name for t, k in zip(layout.targets, keys, strict=True) if k is None]
    if outside:
        raise TargetError(
            f"scope='block': targets {outside[:3]} are not inside a numbered transformer block (a "
            f"child <number> of a container named {list(containers)}). Use scope='global', or "
            "leave those tensors out of the targets."
        )
    blocks = sorted(set(keys), key=natural_key)
    if d < len(blocks):
        raise TargetError(
            f"scope='block' needs at least one coordinate per block, but d={d} and the targets sit in "
            f"{len(blocks)} blocks. Use d >= {len(blocks)}."
        )
    base, extra = divmod(d, len(blocks))
    widths = [base + (k < extra) for k in range(len(blocks))]
    los = [sum(widths[:k]) for k in range(len(blocks))]
    sizes = {b: 0 for b in blocks}
    out = []
    for target, key in zip(layout.targets, keys, strict=True):
        k = blocks.index(key)
        out.append(Segment(seed + k, sizes[key], los[k], los[k] + widths[k]))
        sizes[key] += target.numel
    for k, block in enumerate(blocks):
        if widths[k] > sizes[block]:
            raise TargetError(
                f"scope='block': block {block!r} gets {widths[k]} of d={d} coordinates but holds only "
                f"{sizes[block]} target entries; every group needs one. Use a smaller d."
            )
    return tuple(out)


def packs(model: nn.Module, layout: Layout, parts: Sequence[Segment] = ()) -> list[tuple[str, list[int]]]:
    """Groups of small targets whose weights are computed in one call, with the module that owns each.

    Runs of consecutive small targets (at most :data:`PACK_TARGET` entries each, at most
    :data:`PACK_LIMIT` together) in layout order that are adjacent intervals of one index space
    (``parts``: the targets' segments), so one call covers a run. The owner is the innermost module
    that contains every member and has a forward of its own (a ``ModuleList`` has none). Returns
    ``[(owner_name, [target positions]), ...]`` for runs of two targets or more.
    """
    parts = list(parts) or [Segment(0, t.offset, 0, 0) for t in layout.targets]
    runs: list[list[int]] = [[]]
    total = 0
    for i, target in enumerate(layout.targets):
        prev = runs[-1][-1] if runs[-1] else None
        apart = prev is not None and (
            (parts[prev].seed, parts[prev].lo) != (parts[i].seed, parts[i].lo)
            or parts[prev].start + layout.targets[prev].numel != parts[i].start
        )
        if target.numel > PACK_TARGET or total + target.numel > PACK_LIMIT or apart:
            runs.append([])
            total = 0
        if target.numel <= PACK_TARGET:
            runs[-1].append(i)
            total += target.numel
    out = []
    for run in (r for r in runs if len(r) > 1):
        names = [layout.targets[i].module_name for i in run]
        parts = [name.split(".") if name else [] for name in names]
        common = parts[0]
        for other in parts[1:]:
            n = 0
            while n < min(len(common), len(other)) and common[n] == other[n]:
                n += 1
            common = common[:n]
        while common and type(model.get_submodule(".".join(common))).forward is nn.Module.forward:
            common = common[:-1]
        out.append((".".join(common), run))
    return out
