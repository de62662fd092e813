"""Group ids that are drawn or sorted once at ``apply`` instead of hashed: the reference's other
assignments. Pure integer and sorting math on CPU tensors.

* ``"generator"`` (the reference's ``assignment_backend="materialized"``): ids from a seeded
  ``torch.Generator`` (mt19937), ``randint(0, d, (n,))`` per target in layout order, one generator
  per partition (block scope: one per block, seed ``seed + k``).
* ``"signed_magnitude"`` (``grouping_strategy="signed_magnitude"``): the partition's W0 values
  split into a negative and a non-negative pool, each sorted by magnitude and cut into contiguous
  bins of near-equal size; the seed is not used.

Both are functions of the seed or of W0 that torch's hash kernels cannot regenerate on the fly,
so gpart stores the ids (int16 when d < 2**15, else int32: 2 or 4 bytes per target entry) as
non-persistent buffers: a file still holds theta and the settings alone.

>>> import torch
>>> from gpart.assignment import signed_magnitude
>>> signed_magnitude(torch.tensor([0.3, -0.1, 0.2, -0.5, 0.0, 0.1]), d=3).tolist()
[2, 0, 1, 0, 1, 2]
"""

from __future__ import annotations

import torch

__all__ = ["compact", "generator_ids", "signed_magnitude"]


def generator_ids(sizes: list[int], *, d: int, seed: int) -> list[torch.Tensor]:
    """One partition's ids, target by target: one draw stream of ``torch.randint`` from a CPU
    generator seeded with ``seed`` (the reference's materialized backend, bit for bit)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return [torch.randint(0, d, (n,), generator=generator, dtype=torch.int32) for n in sizes]


def _split(pool: torch.Tensor, mag: torch.Tensor, k: int) -> torch.Tensor:
    """Ids 0..k-1 for the positions ``pool``: contiguous bins of the reference's float32 sort key."""
    n = pool.numel()
    if k > n:  # unreachable when d <= the partition's size
        return torch.arange(n)
    ids = torch.empty(n, dtype=torch.int64)
    key = mag[pool] * float(n + 1) + pool.to(torch.float32) / float(n + 1)  # float32, this order
    order = torch.sort(key, stable=True).indices
    bounds = [(g * n) // k for g in range(k + 1)]
    for g in range(k):
        ids[order[bounds[g] : bounds[g + 1]]] = g
    return ids


def signed_magnitude(values: torch.Tensor, *, d: int) -> torch.Tensor:
    """Ids by sign and magnitude of ``values`` (a partition's W0, flattened in layout order).

    Negatives (and NaN) get groups ``0 .. k_neg - 1``, the rest ``k_neg .. d - 1``, with
    ``k_neg = round(d * negatives / N)`` (at least one group per non-empty pool); inside a pool,
    bin ``g`` holds the sorted positions ``[g n / k, (g + 1) n / k)``, smallest magnitudes first.
    """
    v = values.detach().reshape(-1).to("cpu", torch.float32)
    size = v.numel()
    mag = v.abs()
    nonneg = v >= 0
    pos, neg = torch.nonzero(nonneg).flatten(), torch.nonzero(~nonneg).flatten()
    ids = torch.zeros(size, dtype=torch.int64)
    if neg.numel() == 0 or pos.numel() == 0:
        pool = pos if neg.numel() == 0 else neg
        ids[pool] = _split(pool, mag, d)
        return ids
    if d == 1:
        return ids
    k_neg = round(d * neg.numel() / size)  # Python round: ties to even, as the reference
    k_pos = d - k_neg
    if k_neg < 1:
        k_neg, k_pos = 1, d - 1
    if k_pos < 1:
        k_pos, k_neg = 1, d - 1
    ids[neg] = _split(neg, mag, k_neg)
    ids[pos] = _split(pos, mag, k_pos) + k_neg
    return ids


def compact(ids: torch.Tensor, d: int) -> torch.Tensor:
    """``ids`` in the smallest signed dtype that holds ``0 .. d`` (``d``: the dropped-entry slot)."""
    return ids.to(torch.int16 if d < (1 << 15) - 1 else torch.int32)
