"""The Fastfood projection: the dense structured map of the intrinsic-dimension baseline.

``projection="fastfood"`` replaces the partition by ``delta = c * H G Pi H B (gains * theta)``
per block of ``L`` entries (``L`` the smallest power of two >= d, ``K = ceil(D / L)`` blocks):
``B`` random signs, ``H`` the unnormalized Walsh-Hadamard transform, ``Pi`` a random permutation,
``G`` Gaussian, ``c = 1/sqrt(D L)`` (so ``E[P^T P] = I``). Every entry depends on every
coordinate of theta, unlike the partition's one coordinate. The authors' implementation offers it
as the baseline of the paper's comparison; gpart reproduces it bit for bit on CPU in float32.

The random state (``B``, ``G``, ``Pi``: 9 bytes per position, ``K L`` positions) is drawn from a
CPU generator seeded with the seed, exactly as the reference draws it, and kept as non-persistent
buffers: the reference's memory, nothing more. The anisotropic mode (``isometric=False``) scales
theta by fixed gains from ``0.5`` to ``2`` (ratio 4, RMS 1) in a seeded random order.

>>> import torch
>>> from gpart.fastfood import wht
>>> wht(torch.tensor([[1.0, 0.0, 0.0, 0.0]])).tolist()
[[1.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import math

import torch

__all__ = ["block_size", "draw", "gains", "project", "wht"]

_GAIN_SEED = 0x6A09E667F3BCC909


def block_size(d: int) -> int:
    """``L``: the smallest power of two >= d."""
    return 1 << (d - 1).bit_length()


def draw(seed: int, d: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(signs, gaussians, permutations)``, each ``(K, L)`` (int8, float32, int32), drawn block by
    block from one CPU generator, in the reference's order and sizes (batching the draws would
    change the values: small ``randn`` sizes use another sampler)."""
    length = block_size(d)
    blocks = -(-size // length)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    signs, gaussians, perms = [], [], []
    for _ in range(blocks):
        signs.append(torch.randint(0, 2, (length,), generator=generator, dtype=torch.int8) * 2 - 1)
        gaussians.append(torch.randn(length, generator=generator, dtype=torch.float32))
        perms.append(torch.randperm(length, generator=generator, dtype=torch.int32))
    return torch.stack(signs), torch.stack(gaussians), torch.stack(perms)


def gains(seed: int, d: int) -> torch.Tensor:
    """The anisotropic mode's per-coordinate gains (float32, length d): ``exp`` of an even grid on
    ``[-ln 2, ln 2]``, normalized to RMS 1, in an order drawn with seed ``seed + 0x6A09E667F3BCC909``."""
    h = 0.5 * math.log(4.0)
    gam = torch.exp(torch.linspace(-h, h, d, dtype=torch.float64))
    gam = gam / torch.sqrt(torch.mean(gam * gam))
    generator = torch.Generator(device="cpu")
    generator.manual_seed((seed + _GAIN_SEED) % ((1 << 63) - 1))
    return gam[torch.randperm(d, generator=generator)].float()


def wht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of each row (length a power of two), natural order.

    The butterfly with ``h = 1, 2, 4, ...``: ``(x[j], x[j + h]) -> (x[j] + x[j + h], x[j] - x[j + h])``,
    every level one vectorized add and subtract: the reference's evaluation order, so the same bits.
    """
    rows, length = x.shape
    h = 1
    while h < length:
        pairs = x.view(rows, length // (2 * h), 2, h)
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        x = torch.stack((a + b, a - b), dim=2).reshape(rows, length)
        h *= 2
    return x


def project(
    theta: torch.Tensor,
    signs: torch.Tensor,
    gaussians: torch.Tensor,
    perms: torch.Tensor,
    *,
    size: int,
    start: int,
    numel: int,
) -> torch.Tensor:
    """``delta[start : start + numel]`` of the Fastfood map of ``theta`` (already times the gains),
    computing only the blocks that interval touches, in theta's dtype (float32: the reference's
    bits). Differentiable in theta (plain torch ops)."""
    d, dtype = theta.numel(), theta.dtype
    length = signs.shape[1]
    first, last = start // length, (start + numel - 1) // length
    u = torch.cat([theta, theta.new_zeros(length - d)])
    rows = slice(first, last + 1)
    v = u.unsqueeze(0) * signs[rows].to(dtype)
    v = wht(v)
    v = torch.gather(v, 1, perms[rows].long())
    v = v * gaussians[rows].to(dtype)
    v = wht(v)
    c = float(torch.tensor(1.0 / math.sqrt(size * length), dtype=dtype))  # rounded to theta's dtype
    v = v * c
    offset = start - first * length
    return v.reshape(-1)[offset : offset + numel]
