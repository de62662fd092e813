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

import sys
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import _delta
from .errors import StateError
from .partition import _hash_base
from .targets import Layout, Target

__all__ = ["GPartConfig", "GPartParametrization", "GPartState", "SaveRecipes"]


@dataclass(frozen=True)
class GPartConfig:
    """The settings that, with the layout, reproduce an adapter."""

    d: int
    seed: int
    isometric: bool = True
    bias: str = "none"
    dropout: float = 0.0
    init_bound: float = 0.0
    trainable: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["trainable"] = list(self.trainable)
        return out


class _Recipe:
    """How to rebuild one ``W0 + delta`` in backward: the forward's own inputs, nothing D-sized new."""

    __slots__ = ("backend", "dropout", "handoff", "key", "scale", "seed", "start", "theta", "version", "w0")

    def __init__(self, w0, theta, scale, *, start, seed, dropout, key, backend, handoff=None) -> None:
        self.w0, self.theta, self.scale = w0, theta, scale
        self.start, self.seed, self.dropout, self.key, self.backend = start, seed, dropout, key, backend
        self.handoff = handoff
        self.version = theta._version

    def _kwargs(self) -> dict:
        return {
            "start": self.start,
            "seed": self.seed,
            "dropout": self.dropout,
            "dropout_key": self.key,
            "backend": self.backend,
            "handoff": self.handoff,
        }

    def compute(self) -> torch.Tensor:
        """The forward computation (differentiable in theta)."""
        return _delta.effective(self.w0, self.theta, self.scale, **self._kwargs())

    def __call__(self) -> torch.Tensor:
        """Recompute in backward: the forward's value, as long as theta was not changed in between."""
        if self.theta._version != self.version:
            raise RuntimeError(
                "gpart: theta was modified in place between forward and backward, so the weights "
                "of that forward can no longer be recomputed. Step the optimizer after backward."
            )
        return _delta.recompute(self.w0, self.theta, self.scale, **self._kwargs())


class _Saved:
    """A saved-for-backward view of a gpart weight, stored as its recipe and view geometry."""

    __slots__ = ("geometry", "recipe")

    def __init__(self, recipe: _Recipe, t: torch.Tensor) -> None:
        self.recipe = recipe
        self.geometry = (t.size(), t.stride(), t.storage_offset())


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

    @property
    def active(self) -> bool:
        return bool(self.stack) and self.stack[-1] is not None

    def register(self, out: torch.Tensor, recipe: _Recipe) -> None:
        ptr = _storage_ptr(out)
        if ptr is not None:
            self.live[ptr] = (weakref.ref(out), recipe)

    def enter(self, module: nn.Module, args) -> None:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            self.stack.append(None)
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

    def exit(self, module: nn.Module, args, output) -> None:
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
            return packed.recipe().as_strided(*packed.geometry)
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
    ) -> None:
        super().__init__()
        self.config = config
        self.layout = layout
        self.enabled = True
        self.backend = backend  # which kernel of gpart._delta computes the deltas
        self.recipes: SaveRecipes | None = SaveRecipes() if recompute else None  # None: save W0 + delta
        self.theta = nn.Parameter(torch.zeros(config.d, dtype=torch.float32, device=scale.device))
        # Derived from the seed, so not part of state_dict: a checkpoint holds theta alone.
        self.register_buffer("scale", scale, persistent=False)
        # requires_grad of every parameter before apply, so remove/merge can restore it exactly.
        self.saved_requires_grad: dict[str, bool] = {}
        self.saved_order: dict[str, list[str]] = {}

    def forward(self, x):
        """Identity: a container root (``nn.Sequential``) calls its children in turn, this one too."""
        return x

    def _apply(self, fn, recurse=True):
        # model.half()/.to(bfloat16) must not lower theta's precision: its updates are tiny.
        super()._apply(fn, recurse)
        for t in (self.theta, self.scale):
            if t.dtype != torch.float32:
                t.data = t.data.float()
        if self.theta.grad is not None and self.theta.grad.dtype != torch.float32:
            self.theta.grad.data = self.theta.grad.data.float()
        return self

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d={c.d}, seed={c.seed}, D={self.layout.size}, targets={len(self.layout.targets)}, "
            f"isometric={c.isometric}, bias={c.bias!r}, dropout={c.dropout}"
        )


def _check_reentrant_checkpoint() -> None:
    """Raise if this forward runs inside a reentrant checkpoint that would lose theta's gradient.

    Reentrant checkpointing runs a block without autograd and replays it in backward, as a
    separate backward pass, only if an input requires grad. Two silent failures follow, because
    theta is shared by every block: (1) in a frozen model the hidden states need no grad, so the
    block is never replayed and theta misses its gradient; (2) under DDP each replay delivers a
    part of theta's gradient, and DDP reduces theta after the first part (measured: theta off by
    more than its own size after 5 steps). Grad mode is off here, which is rare during training,
    so walking up the call stack costs nothing in practice.
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
        elif frame.f_code is ddp_code and inside:
            raise StateError(
                "reentrant activation checkpointing under DistributedDataParallel: theta is used by "
                "every checkpointed block; its gradient arrives in one separate backward pass per block "
                f"and DDP reduces an incomplete one (measured: theta wrong). {_NON_REENTRANT}."
            )
        frame = frame.f_back


_NON_REENTRANT = (
    "Use non-reentrant checkpointing (torch.utils.checkpoint.checkpoint(..., use_reentrant=False); "
    "transformers: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False}))"
)


class GPartParametrization(nn.Module):
    """``W -> W0 + reshape(P theta)[interval]``, registered on one target tensor."""

    def __init__(self, state: GPartState, target: Target) -> None:
        super().__init__()
        # object.__setattr__ keeps the state out of this module's children: theta is registered
        # once, on the root, and found through the state at call time.
        object.__setattr__(self, "state", state)
        self.start = target.offset
        self.numel = target.numel
        self.droppable = target.param_name != "bias"  # the method never drops bias deltas
        # The hash offset as a tensor, for torch.compile: a constant offset lets Inductor run its
        # value-range analysis through the 64-bit hash with exact huge integers, which takes
        # minutes; a buffer is a runtime input with an unknown range. 8 bytes, not saved.
        self.register_buffer(
            "hash_base", torch.tensor(_hash_base(state.config.seed, self.start)), persistent=False
        )

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        state: GPartState = self.state
        if not state.enabled:
            return w0
        if not torch.is_grad_enabled() and state.theta.requires_grad and not torch.compiler.is_compiling():
            _check_reentrant_checkpoint()
        p = state.config.dropout if self.training and self.droppable else 0.0
        return self.effective(w0, dropout=p)

    def effective(self, w0: torch.Tensor, *, dropout: float) -> torch.Tensor:
        """``W0 + delta`` with the given dropout probability (0 for merging and evaluation)."""
        state: GPartState = self.state
        if torch.compiler.is_compiling():  # plain ops: traced whole, no graph break, no host sync
            key = torch.randint(0, 1 << 62, (), device=w0.device) if dropout > 0.0 else None
            return _delta.traced(
                w0,
                state.theta.to(w0.device),
                state.scale.to(w0.device, state.theta.dtype),
                base=self.hash_base,
                start=self.start,
                dropout=dropout,
                dropout_key=key,
            )
        recipe = _Recipe(
            w0.detach(),
            state.theta.to(w0.device),
            state.scale.to(w0.device),
            start=self.start,
            seed=state.config.seed,
            dropout=dropout,
            key=int(torch.randint(0, 1 << 62, ())) if dropout > 0.0 else 0,
            backend=state.backend,
            handoff=state.recipes.handoff if state.recipes is not None else None,
        )
        out = recipe.compute()
        if state.recipes is not None and state.recipes.active and out.requires_grad:
            state.recipes.register(out, recipe)
        return out

    def extra_repr(self) -> str:
        return f"start={self.start}, numel={self.numel}"
