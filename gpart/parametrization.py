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

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import _delta
from .targets import Layout, Target

__all__ = ["GPartConfig", "GPartParametrization", "GPartState"]


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


class GPartState(nn.Module):
    """Holds ``theta`` (fp32, length d), the group scales, the settings and the layout."""

    def __init__(self, config: GPartConfig, layout: Layout, scale: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.layout = layout
        self.enabled = True
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

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        state: GPartState = self.state
        if not state.enabled:
            return w0
        p = state.config.dropout if self.training and self.droppable else 0.0
        return self.effective(w0, dropout=p)

    def effective(self, w0: torch.Tensor, *, dropout: float) -> torch.Tensor:
        """``W0 + delta`` with the given dropout probability (0 for merging and evaluation)."""
        state: GPartState = self.state
        key = int(torch.randint(0, 1 << 62, ())) if dropout > 0.0 else 0
        delta = _delta.materialize(
            state.theta.to(w0.device),
            state.scale.to(w0.device),
            start=self.start,
            numel=self.numel,
            seed=state.config.seed,
            dropout=dropout,
            dropout_key=key,
        )
        return w0 + delta.view(w0.shape).to(w0.dtype)

    def extra_repr(self) -> str:
        return f"start={self.start}, numel={self.numel}"
