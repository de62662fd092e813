"""The autograd side: the holder of ``theta`` and the per-tensor parametrization.

``GPartState`` is attached once to the root model (as ``model.gpart``) and owns the only
trainable tensor, ``theta``, plus the per-group scales. Each target tensor gets a
:class:`GPartParametrization` (through ``torch.nn.utils.parametrize``) that knows its interval of
the global index space and computes ``W0 + delta`` on every access.

The parametrizations reach ``theta`` through the state module *at call time*: they hold the
module, never a tensor, so wrappers that swap parameter objects (FSDP, ``load_state_dict(...,
assign=True)``) cannot leave a stale copy behind, and ``theta`` is registered exactly once.
"""

from __future__ import annotations

import collections
import sys
import weakref
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from . import _delta, fastfood
from .errors import StateError
from .partition import hash_base
from .targets import Layout, Segment, Target

__all__ = [
    "Assignment",
    "Backend",
    "Bias",
    "GPartConfig",
    "GPartParametrization",
    "GPartState",
    "Pack",
    "Projection",
    "SaveRecipes",
    "Scope",
]


#: The option types of :func:`gpart.apply` (one source for the values gpart accepts).
Bias = Literal["none", "all"]
Scope = Literal["global", "block"]
Assignment = Literal["hash", "generator", "signed_magnitude"]
Projection = Literal["partition", "fastfood"]
Backend = Literal["auto", "eager", "compiled"]


@dataclass(frozen=True)
class GPartConfig:
    """The settings that, with the layout, reproduce an adapter."""

    d: int
    seed: int
    isometric: bool = True
    bias: Bias = "none"
    dropout: float = 0.0
    init_bound: float = 0.0
    trainable: tuple[str, ...] = ()
    scope: Scope = "global"
    assignment: Assignment = "hash"
    projection: Projection = "partition"
    block_containers: tuple[str, ...] = ()  # () = gpart.targets.BLOCK_CONTAINERS

    def to_dict(self) -> dict:
        out = asdict(self)
        out["trainable"] = list(self.trainable)
        out["block_containers"] = list(self.block_containers)
        return out


class _Recipe:
    """How to rebuild ``W0 + delta`` in backward: the forward's own inputs, nothing D-sized new.

    ``w0s`` is one target's W0, or the W0s of a :class:`Pack` (flattened and concatenated at each
    use, never kept so). Several saved views can share one recipe (a pack's targets, or one weight
    saved twice); the recomputed value is kept only until the last of them is unpacked.
    """

    __slots__ = (
        "backend",
        "dropout",
        "handoff",
        "ids",
        "key",
        "pending",
        "scale",
        "seed",
        "start",
        "theta",
        "value",
        "version",
        "w0s",
    )

    def __init__(
        self, w0s, theta, scale, *, start, seed, dropout, key, backend, handoff=None, ids=None
    ) -> None:
        self.w0s, self.theta, self.scale, self.ids = w0s, theta, scale, ids
        self.start, self.seed, self.dropout, self.key, self.backend = start, seed, dropout, key, backend
        self.handoff = handoff
        self.version = theta._version
        self.pending = 0  # saved views of the result not unpacked yet
        self.value: torch.Tensor | None = None

    def _w0(self) -> torch.Tensor:
        if len(self.w0s) == 1:
            return self.w0s[0]
        return torch.cat([w.reshape(-1) for w in self.w0s])

    def _kwargs(self) -> dict:
        return {
            "start": self.start,
            "seed": self.seed,
            "dropout": self.dropout,
            "dropout_key": self.key,
            "backend": self.backend,
            "handoff": self.handoff,
            "ids": self.ids,
        }

    def compute(self, live: torch.Tensor | None = None) -> torch.Tensor:
        """The forward computation (differentiable in theta, and in ``live``: the W0 this recipe
        was made from when it requires grad, i.e. the output of another adapter on the tensor)."""
        w0 = self._w0() if live is None else live
        return _delta.effective(w0, self.theta, self.scale, **self._kwargs())

    def unpack(self, geometry) -> torch.Tensor:
        """One saved view, rebuilt in backward: the forward's value, unless theta changed in between."""
        if self.theta._version != self.version:
            raise RuntimeError(
                "gpart: theta was modified in place between forward and backward, so the weights "
                "of that forward can no longer be recomputed. Step the optimizer after backward."
            )
        value = self.value
        if value is None:
            value = _delta.recompute(self._w0(), self.theta, self.scale, **self._kwargs())
        self.pending -= 1
        self.value = value if self.pending > 0 else None
        return value.as_strided(*geometry)


class _Saved:
    """A saved-for-backward view of a gpart weight, stored as its recipe and view geometry."""

    __slots__ = ("geometry", "recipe")

    def __init__(self, recipe: _Recipe, t: torch.Tensor) -> None:
        self.recipe = recipe
        self.geometry = (t.size(), t.stride(), t.storage_offset())
        recipe.pending += 1


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses, meta/fake tensors
        return None


class SaveRecipes:
    """Forward hooks for target modules: recompute ``W0 + delta`` in backward instead of saving it.

    A layer such as ``F.linear`` saves its weight for backward; for a gpart target that weight is a
    fresh D-sized tensor. While a target module runs its forward, these hooks replace any saved
    view of a gpart weight by a :class:`_Recipe` (the forward's inputs: W0, theta, the dropout
    key), and rebuild it when backward unpacks it. Every other saved tensor goes to the hooks that
    were active before (e.g. ``save_on_cpu``) untouched.
    """

    def __init__(self) -> None:
        self.handoff = _delta.IdsHandoff()
        self.live: dict[int, tuple[weakref.ref, _Recipe]] = {}
        self.stack: list[torch.autograd.graph.saved_tensors_hooks | None] = []
        self.outers: list[object] = []  # the hooks each entry of `stack` passes other tensors to

    @property
    def active(self) -> bool:
        return bool(self.stack) and self.stack[-1] is not None

    @property
    def outer(self) -> object:
        """The saved-tensor hooks that were active when the innermost target module was entered."""
        return self.outers[-1]

    def register(self, out: torch.Tensor, recipe: _Recipe) -> None:
        ptr = _storage_ptr(out)
        if ptr is not None:
            self.live[ptr] = (weakref.ref(out), recipe)

    def enter(self, module: nn.Module, args) -> None:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            self.stack.append(None)
            self.outers.append(None)
            return
        try:
            outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        except (AttributeError, TypeError):  # private API: without it, outer hooks are bypassed
            outer = None
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: self._pack(t, outer), lambda packed: self._unpack(packed, outer)
        )
        hooks.__enter__()
        self.stack.append(hooks)
        self.outers.append(outer)

    def exit(self, module: nn.Module, args, output) -> None:
        self.outers.pop()
        hooks = self.stack.pop()
        if hooks is not None:
            hooks.__exit__(None, None, None)
        if not self.stack:
            self.live.clear()

    def _pack(self, t: torch.Tensor, outer):
        entry = self.live.get(_storage_ptr(t)) if type(t) is torch.Tensor else None
        if entry is not None and entry[0]() is not None:
            return _Saved(entry[1], t)
        return t.detach() if outer is None else (outer[1], outer[0](t))

    @staticmethod
    def _unpack(packed, outer) -> torch.Tensor:
        if isinstance(packed, _Saved):
            return packed.recipe.unpack(packed.geometry)
        if outer is None:
            return packed
        unpack, inner = packed
        return unpack(inner)


class GPartState(nn.Module):
    """Holds ``theta`` (fp32, length d), the group scales, the settings and the layout."""

    def __init__(
        self,
        config: GPartConfig,
        layout: Layout,
        scale: torch.Tensor,
        *,
        backend: str = "eager",
        recompute: bool = True,
        name: str = "default",
    ) -> None:
        super().__init__()
        self.config = config
        self.layout = layout
        self.name = name  # the adapter's name (several adapters can share a model)
        self.enabled = True  # False within gpart.disabled
        self.active = True  # False when gpart.set_active leaves this adapter out
        self.backend = backend  # which kernel of gpart._delta computes the deltas
        self.recipes: SaveRecipes | None = SaveRecipes() if recompute else None  # None: save W0 + delta
        self.theta = nn.Parameter(torch.zeros(config.d, dtype=torch.float32, device=scale.device))
        # Derived from the seed, so not part of state_dict: a checkpoint holds theta alone.
        self.register_buffer("scale", scale, persistent=False)
        self.packs: list[tuple[nn.Module, Pack]] = []  # (owner module, pack), see gpart.targets.packs

    def recipe(self, w0s, segment: Segment, *, dropout: float, key: int, ids=None) -> _Recipe:
        """The recipe of ``W0 + delta`` over the W0s ``w0s`` (one target's, or a pack's), from the
        position ``segment.start`` of the segment's index space."""
        device = w0s[0].device
        theta, scale = self.share(segment)
        return _Recipe(
            tuple(w.detach() for w in w0s),
            theta.to(device),
            scale.to(device),
            start=segment.start,
            seed=segment.seed,
            dropout=dropout,
            key=key if dropout > 0.0 else 0,
            backend=self.backend,
            handoff=self.recipes.handoff if self.recipes is not None else None,
            ids=ids,
        )

    def share(self, segment: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment's part of theta and of the scales (all of them in the global scope)."""
        if (segment.lo, segment.hi) == (0, self.config.d):
            return self.theta, self.scale
        return self.theta[segment.lo : segment.hi], self.scale[segment.lo : segment.hi]

    def keep_recipe(self, out: torch.Tensor, recipe: _Recipe) -> None:
        """Let backward rebuild ``out`` from ``recipe`` if a target module's forward saves it."""
        if self.recipes is not None and self.recipes.active and out.requires_grad:
            self.recipes.register(out, recipe)

    def forward(self, x):
        """Identity: a container root (``nn.Sequential``) calls its children in turn, this one too."""
        return x

    def set_fastfood(self, signs, gaussians, perms, *, device) -> None:
        """Keep the Fastfood projection's random state (non-persistent: redrawn from the seed)."""
        for name, t in (("ff_signs", signs), ("ff_gauss", gaussians), ("ff_perms", perms)):
            self.register_buffer(name, t.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.half()/.to(bfloat16) must not lower the precision of theta (its updates are tiny),
        # the scales or the Fastfood Gaussians: they keep their exact float32 values, moved only.
        exact = {n: getattr(self, n).data for n in ("theta", "scale", "ff_gauss") if hasattr(self, n)}
        super()._apply(fn, recurse)
        for name, before in exact.items():
            now = getattr(self, name)
            if now.dtype != torch.float32:
                now.data = before.to(now.device)
        if self.theta.grad is not None and self.theta.grad.dtype != torch.float32:
            self.theta.grad.data = self.theta.grad.data.float()
        return self

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"name={self.name!r}, active={self.active}, d={c.d}, seed={c.seed}, D={self.layout.size}, "
            f"targets={len(self.layout.targets)}, "
            f"isometric={c.isometric}, bias={c.bias!r}, dropout={c.dropout}"
        )


def _check_reentrant_checkpoint() -> None:
    """Raise if this forward runs inside a reentrant checkpoint that would lose theta's gradient.

    Reentrant checkpointing runs a block without autograd and replays it in backward, as a
    separate backward pass, only if an input requires grad. Two silent failures follow, because
    theta is shared by every block: (1) in a frozen model the hidden states need no grad, so the
    block is never replayed and theta misses its gradient; (2) under DDP each replay delivers a
    part of theta's gradient, and DDP reduces theta after the first part (measured: theta off by
    more than its own size after 5 steps). ``DistributedDataParallel(static_graph=True)`` waits
    for every part (tested: it trains like one process), so it passes.

    Called only for a target computed in training mode, with grad mode off while theta requires
    grad: the one situation a reentrant checkpoint creates in training (evaluation under
    ``torch.no_grad`` runs in eval mode and never walks the stack). It recognizes torch's own
    reentrant checkpoint (``torch.utils.checkpoint``, which transformers uses); other reentrant
    implementations (DeepSpeed's, Megatron's, hand-written autograd Functions) go unseen.
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.checkpoint import CheckpointFunction

    checkpoint_code, ddp_code = CheckpointFunction.forward.__code__, DistributedDataParallel.forward.__code__
    frame, inside = sys._getframe(2), False
    while frame is not None:
        if frame.f_code is checkpoint_code and not inside:
            inside = True
            args = frame.f_locals.get("args", ())
            if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                raise StateError(
                    "reentrant activation checkpointing around a gpart target whose inputs do not "
                    "require grad: the block would never be replayed in backward and theta would get "
                    f"no gradient from it. {_NON_REENTRANT}, or make the inputs require grad "
                    "(transformers: model.enable_input_require_grads())."
                )
        elif (
            frame.f_code is ddp_code
            and inside
            and not getattr(frame.f_locals.get("self"), "static_graph", False)
        ):
            raise StateError(
                "reentrant activation checkpointing under DistributedDataParallel: theta is used by "
                "every checkpointed block; its gradient arrives in one separate backward pass per block "
                f"and DDP reduces an incomplete one (measured: theta wrong). {_NON_REENTRANT}, or "
                "wrap the model in DistributedDataParallel(..., static_graph=True)."
            )
        frame = frame.f_back


_NON_REENTRANT = (
    "Use non-reentrant checkpointing (torch.utils.checkpoint.checkpoint(..., use_reentrant=False); "
    "transformers: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False}))"
)


def _foreign_saved_hooks(state: GPartState) -> bool:
    """Whether saved-tensor hooks other than gpart's own are active (e.g. activation checkpointing)."""
    recipes = state.recipes
    if recipes is not None and recipes.active:
        return recipes.outer is not None
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError):  # private API: unknown counts as present (the safe side)
        return True


class Pack:
    """Small targets whose ``W0 + delta`` are computed in one call per forward of their owner module.

    A small target costs more in per-call overhead (a dozen tensor ops, each a few microseconds on
    a CPU, a kernel launch on a GPU) than in per-entry work. The targets of a pack are consecutive
    in the index space, so one kernel call over their joint interval computes all their weights:
    one hash pass instead of one per target, one delta node in the autograd graph. The owner is
    the innermost module whose forward runs every member; its forward hooks open and close a session:
    the first member accessed in a session computes the pack, each member takes its own weight
    once, and whatever is left is dropped when the session closes. Everything else (an access
    outside a session, a second access in one, a sharded or mixed-dtype W0) takes the
    per-target path, which gives the same values.

    **Dropout keys.** A session draws one dropout key from the RNG, at its first member access,
    and every member access of the session uses it, packed or not: the masks, hence the trained
    theta, do not depend on which path computed a weight (FSDP2 computes each weight on its own,
    for instance). Activation checkpointing replays a block after the session has closed, with
    the RNG as it was when the block started, and a replay must compute what the forward did.
    So an access under checkpointing (saved-tensor hooks other than gpart's, or grad off)
    records its key under a token, a digest of the RNG state at that moment with the member's
    index; the replay reaches the same RNG state, finds the key, and repeats the forward's draw
    if it made one. Nor does a pack serve an access under saved-tensor hooks other than gpart's:
    a checkpointed block is replayed one target at a time, and its replay must save the same
    tensors as its forward did.
    """

    #: Tokens kept for replays, at most (the oldest go first): replays follow their forward
    #: within one step, so this bounds memory without ever mattering.
    MAX_TOKENS = 1 << 16

    def __init__(self, state: GPartState, plists: list[nn.Module]):
        """``plists``: the members' ``ParametrizationList``s (this adapter's parametrization first,
        so that it reads W0 itself), in order."""
        self.state, self.plists = state, plists
        self.members: list[GPartParametrization] = [plist[0] for plist in plists]
        for index, member in enumerate(self.members):
            member.pack, member.index = self, index
        self.start = self.members[0].start
        self.sizes = [m.numel for m in self.members]
        self.depth = 0
        self.filled = False
        self.key: int | None = None  # the open session's dropout key, once drawn
        self.stash: dict[int, tuple[torch.Tensor, torch.Tensor, _Recipe, float, bool]] = {}
        self.tokens: collections.OrderedDict[tuple[int, int], tuple[int, bool]] = collections.OrderedDict()

    def open(self, module: nn.Module, args) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth += 1

    def close(self, module: nn.Module, args, output) -> None:
        if torch.compiler.is_compiling() or self.depth == 0:
            return
        self.depth -= 1
        if self.depth == 0:
            self.stash.clear()
            self.filled = False
            self.key = None

    def key_for(self, index: int) -> int:
        """The dropout key of member ``index``'s access now (see the class docstring)."""
        if self.depth == 0 or _in_backward():  # outside a session: a replay, or an access of its own
            if self.tokens:
                found = self.tokens.get((_rng_digest(), index))
                if found is not None:
                    key, drew = found
                    if drew:
                        _draw_key()  # the forward drew here: so does its replay
                    return key
            return _draw_key()
        token = (_rng_digest(), index) if _checkpointing(self.state) else None
        drew = self.key is None
        if drew:
            self.key = _draw_key()
        if token is not None:
            self.tokens[token] = (self.key, drew)
            if len(self.tokens) > self.MAX_TOKENS:
                self.tokens.popitem(last=False)
        return self.key

    def take(self, index: int, w0: torch.Tensor, dropout: float) -> tuple[torch.Tensor, _Recipe] | None:
        """Member ``index``'s ``W0 + delta`` from this session's pack call, or None (per-target path)."""
        if self.depth == 0 or _foreign_saved_hooks(self.state):
            return None
        if not self.filled:
            self.filled = True
            self._fill(dropout)
        entry = self.stash.pop(index, None)
        # A pack computed without grad (a reentrant-checkpointed block) is no use to a forward with
        # grad (a head after those blocks): that weight would not reach theta.
        if entry is None or entry[1] is not w0 or entry[3] != dropout or entry[4] != torch.is_grad_enabled():
            return None
        return entry[0], entry[2]

    def _fill(self, dropout: float) -> None:
        state = self.state
        w0s = [plist.original for plist in self.plists]
        first = w0s[0]
        if any(type(w) not in _PLAIN or w.dtype != first.dtype or w.device != first.device for w in w0s):
            return  # sharded (DTensor) or mixed: per target
        if any(m.rate() != dropout for m in self.members):
            return  # dropout on some members only (biases are never dropped): per target
        if dropout > 0.0 and self.key is None:
            return  # no key drawn in this session (cannot happen through forward): per target
        recipe = state.recipe(w0s, self.members[0].segment, dropout=dropout, key=self.key)
        parts = recipe.compute().split(self.sizes)
        grad = torch.is_grad_enabled()
        self.stash = {
            i: (part.view(w0.shape), w0, recipe, dropout, grad)
            for i, (part, w0) in enumerate(zip(parts, w0s, strict=True))
        }


def _in_backward() -> bool:
    """Whether this runs inside a backward pass (where checkpointing replays its blocks)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # private API: without it, a replay is told by the closed session alone
        return False


def _checkpointing(state: GPartState) -> bool:
    """Whether a later replay of this forward is possible: saved-tensor hooks or grad off."""
    return not torch.is_grad_enabled() or _foreign_saved_hooks(state)


def _rng_digest() -> int:
    """A digest of the default CPU generator's state (the source of dropout keys); ~3 us."""
    return hash(torch.get_rng_state().numpy().tobytes())


_PLAIN = (torch.Tensor, nn.Parameter)  # not a tensor subclass such as an FSDP2 shard (DTensor)


def _draw_key() -> int:
    """A fresh dropout key from the default (CPU) generator: no device involved, no host sync."""
    return int(torch.randint(0, 1 << 62, ()))


class GPartParametrization(nn.Module):
    """``W -> W0 + reshape(P theta)[interval]``, registered on one target tensor."""

    def __init__(
        self, state: GPartState, target: Target, segment: Segment, ids: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        # object.__setattr__ keeps the state out of this module's children: theta is registered
        # once, on the root, and found through the state at call time.
        object.__setattr__(self, "state", state)
        self.segment = segment
        self.start = segment.start
        self.numel = target.numel
        self.droppable = target.param_name != "bias"  # the method never drops bias deltas
        # The hash offset as a tensor, for torch.compile: a constant offset lets Inductor run its
        # value-range analysis through the 64-bit hash with exact huge integers, which takes
        # minutes; a buffer is a runtime input with an unknown range. 8 bytes, not saved.
        self.register_buffer("hash_base", torch.tensor(hash_base(segment.seed, self.start)), persistent=False)
        # Group ids drawn or sorted at apply (gpart.assignment); None: hashed on the fly.
        self.register_buffer("ids", ids, persistent=False)
        self.pack: Pack | None = None  # set by gpart.apply for small targets
        self.index = 0  # position in the pack

    def rate(self) -> float:
        """The delta dropout probability of this tensor's current forward."""
        return self.state.config.dropout if self.training and self.droppable else 0.0

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        state: GPartState = self.state
        if not (state.enabled and state.active):
            return w0
        compiling = torch.compiler.is_compiling()
        if self.training and not compiling and not torch.is_grad_enabled() and state.theta.requires_grad:
            _check_reentrant_checkpoint()
        p = self.rate()
        key = None
        if self.pack is not None and not compiling:
            key = self.pack.key_for(self.index) if p > 0.0 else None
            hit = self.pack.take(self.index, w0, p)
            if hit is not None:
                out, recipe = hit
                state.keep_recipe(out, recipe)
                return out
        return self.effective(w0, dropout=p, key=key)

    def effective(self, w0: torch.Tensor, *, dropout: float, key: int | None = None) -> torch.Tensor:
        """``W0 + delta`` with the given dropout probability (0 for merging and evaluation) and
        dropout key (None: a fresh one)."""
        state: GPartState = self.state
        if state.config.projection == "fastfood":
            return self._fastfood(w0, dropout, key)
        if torch.compiler.is_compiling():  # plain ops: traced whole, no graph break, no host sync
            key = torch.randint(0, 1 << 62, (), device=w0.device) if dropout > 0.0 else None
            theta, scale = state.share(self.segment)
            return _delta.traced(
                w0,
                theta.to(w0.device),
                scale.to(w0.device, theta.dtype),
                base=self.hash_base,
                start=self.start,
                dropout=dropout,
                dropout_key=key,
                ids=self.ids,
            )
        if dropout > 0.0 and key is None:
            key = _draw_key()
        recipe = state.recipe((w0,), self.segment, dropout=dropout, key=key, ids=self.ids)
        out = recipe.compute(w0 if w0.requires_grad else None)
        state.keep_recipe(out, recipe)
        return out

    def _fastfood(self, w0: torch.Tensor, dropout: float, key: int | None) -> torch.Tensor:
        """``W0 + delta`` of the Fastfood projection: plain differentiable ops (autograd keeps what
        backward needs), only the blocks this target's interval touches; the dropout mask from the
        position hash as in the partition."""
        state: GPartState = self.state
        theta = (state.theta * state.scale).to(w0.device)  # the scales hold the gains
        delta = fastfood.project(
            theta,
            state.ff_signs,
            state.ff_gauss,
            state.ff_perms,
            size=state.layout.size,
            start=self.start,
            numel=self.numel,
        )
        if dropout > 0.0:
            if torch.compiler.is_compiling():
                keep = _delta.keep_mask_traced(self.numel, self.hash_base, dropout, device=w0.device)
            else:
                key = _draw_key() if key is None else key
                keep = _delta.keep_mask(self.start, self.numel, self.segment.seed, dropout, key, w0.device)
            delta = torch.where(keep, delta * _delta.dropout_scale(dropout), 0.0)
        return _delta.add_delta(w0.reshape(-1), delta).view(w0.shape)

    def extra_repr(self) -> str:
        return f"start={self.start}, numel={self.numel}"
