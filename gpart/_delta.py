"""The delta path: theta -> the flat delta of one target interval, and its exact gradient.

This is the one small, swappable piece that turns the partition into numbers. Everything else
(parametrization, verbs, files) calls only :func:`materialize`.

Forward:  ``delta[k] = theta[g] * s[g] * m[k] / (1 - p)`` with ``g = g(start + k)`` and ``m`` the
          dropout keep-mask (all ones when ``p == 0``).
Backward: ``grad_theta[j] = s[j] * sum_{k in group j} grad_delta[k] * m[k] / (1 - p)``
          (``P^T grad``, a segment sum).

Group ids and the dropout mask are *regenerated* in backward from integers (the interval, the
seed, a dropout key), never saved: gpart keeps nothing whose size grows with D for backward.
Work is done in chunks so the int64 temporaries stay bounded whatever the target's size.
"""

from __future__ import annotations

import torch

from .partition import DEFAULT_CHUNK, _shr, _splitmix64, group_ids

# The dropout mask compares the top 24 hash bits with an integer threshold: exact on every device.
_MASK_BITS = 24


def _keep_mask(key: int, start: int, count: int, p: float, device: torch.device) -> torch.Tensor:
    """Reproducible Bernoulli(1 - p) keep-mask for positions ``[start, start + count)``."""
    threshold = round(p * (1 << _MASK_BITS))
    return _shr(_splitmix64(key, start, count, device), 64 - _MASK_BITS) >= threshold


class _GatherScatter(torch.autograd.Function):
    """``delta = (theta * scale)[g] (* mask)`` forward; segment sum of the gradient backward."""

    @staticmethod
    def forward(ctx, theta, scale, start, numel, d, seed, p, key, chunk):
        weighted = theta * scale
        out = torch.empty(numel, dtype=theta.dtype, device=theta.device)
        for lo in range(0, numel, chunk):
            n = min(chunk, numel - lo)
            ids = group_ids(start + lo, n, d=d, seed=seed, device=theta.device)
            part = torch.index_select(weighted, 0, ids, out=out[lo : lo + n])
            if p > 0.0:
                part.mul_(_keep_mask(key, start + lo, n, p, theta.device)).div_(1.0 - p)
        ctx.save_for_backward(scale)  # d values: not D-sized
        ctx.args = (start, numel, d, seed, p, key, chunk)
        return out

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        start, numel, d, seed, p, key, chunk = ctx.args
        grad_theta = None
        if ctx.needs_input_grad[0]:
            acc = torch.zeros(d, dtype=scale.dtype, device=grad.device)
            for lo in range(0, numel, chunk):
                n = min(chunk, numel - lo)
                ids = group_ids(start + lo, n, d=d, seed=seed, device=grad.device)
                part = grad[lo : lo + n].to(acc.dtype)
                if p > 0.0:
                    part = part * _keep_mask(key, start + lo, n, p, grad.device) / (1.0 - p)
                acc.index_add_(0, ids, part)
            grad_theta = acc * scale
        return grad_theta, None, None, None, None, None, None, None, None


def materialize(
    theta: torch.Tensor,
    scale: torch.Tensor,
    *,
    start: int,
    numel: int,
    seed: int,
    dropout: float = 0.0,
    dropout_key: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Flat delta (dtype of ``theta``) of the interval ``[start, start + numel)``; differentiable in theta.

    ``dropout_key`` selects the dropout mask (ignored when ``dropout == 0``); the same key always
    gives the same mask, which is how backward reproduces it without storing it.
    """
    return _GatherScatter.apply(
        theta, scale.to(theta.dtype), start, numel, theta.numel(), seed, dropout, dropout_key, chunk
    )
