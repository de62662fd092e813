"""The seeded global partition: which group each flat index belongs to. Pure integer math.

Every target entry has a global position ``i`` in ``[0, D)``. Its group is

    g(i) = splitmix64(seed + i) mod d

computed on unsigned 64-bit integers (the SplitMix64 output function, as in the authors'
"stateless" backend). Nothing is stored: any interval of positions can be regenerated on any
device, chunk by chunk, bit-identically. Changing this function silently breaks every saved
adapter, so it carries a version id (:data:`ALGORITHM`) that is written into files and pinned by
golden tests.

torch has no uint64 arithmetic, so the hash runs on int64 bit patterns: addition and
multiplication wrap identically (two's complement), but ``>>`` sign-extends and ``%`` is signed,
so the logical shift and the unsigned remainder are emulated below.

>>> from gpart.partition import group_ids, group_counts, group_scales
>>> group_ids(0, 4, d=1000, seed=42).tolist()
[413, 160, 331, 326]
>>> counts = group_counts(10_000, d=16, seed=0)
>>> int(counts.sum())
10000
>>> float(group_scales(torch.tensor([4, 0]), isometric=True)[0])
0.5
"""

from __future__ import annotations

import torch

__all__ = ["ALGORITHM", "group_counts", "group_ids", "group_scales"]

#: Version id of the assignment rule. Written into every adapter file; bump it (and keep the old
#: rule loadable) if the rule ever changes.
ALGORITHM = "splitmix64-v1"

_U64 = 1 << 64
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

#: Default number of positions hashed at once: bounds the int64 temporaries (~8 MiB each).
DEFAULT_CHUNK = 1 << 20


def _as_int64(value: int) -> int:
    """The signed int64 with the same low 64 bits as ``value`` (any Python int)."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` alone would sign-extend)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _umod(z: torch.Tensor, d: int) -> torch.Tensor:
    """``z mod d`` with ``z`` read as unsigned 64-bit, for ``0 < d < 2**63``."""
    r = torch.remainder(z, d)  # floor-mod: in [0, d) for the signed value
    fix = _U64 % d  # a negative z stands for z + 2**64
    if fix:
        r = torch.remainder(r + (z < 0).to(r.dtype) * fix, d)
    return r


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 output function, in place, on int64 bit patterns (eager and compiled alike)."""
    z ^= _shr(z, 30)
    z *= _as_int64(_MIX1)
    z ^= _shr(z, 27)
    z *= _as_int64(_MIX2)
    z ^= _shr(z, 31)
    return z


def _splitmix64(key: int, start: int, count: int, device: torch.device | str | None) -> torch.Tensor:
    """SplitMix64 output of ``key + start + k`` for ``k`` in ``[0, count)``, as int64 bit patterns."""
    z = torch.arange(count, dtype=torch.int64, device=device)
    z += _hash_base(key, start)  # wraps modulo 2**64, like uint64
    return _mix_(z)


def _hash_base(key: int, start: int) -> int:
    """The int64 that ``arange(count)`` is offset by before mixing (see :func:`_splitmix64`)."""
    return _as_int64(key + start + _GOLDEN)


#: :func:`_umod_fast` is exact for d below this bound (products stay below 2**63).
FAST_MOD_LIMIT = 1 << 31


def _fmod32(x: torch.Tensor, d_f, inv_d) -> torch.Tensor:
    """``x mod d`` in float64 for integer-valued ``0 <= x < 2**32``: every step is exact
    (values below 2**53) and the quotient estimate is off by at most one."""
    r = x - (x * inv_d).floor() * d_f
    r = torch.where(r < 0, r + d_f, r)
    return torch.where(r >= d_f, r - d_f, r)


def _umod_fast(z: torch.Tensor, d, inv_d, two32_mod_d) -> torch.Tensor:
    """Unsigned ``z mod d`` without integer division (which has no SIMD form), for d < 2**31.

    With ``z = hi * 2**32 + lo``: ``z mod d = ((hi mod d) * (2**32 mod d) + (lo mod d)) mod d``.
    The two inner reductions run in float64 (exact below 2**53); the outer one sees
    ``t < d**2 + d < 2**63`` with a float64 quotient off by at most one, so a correction each way
    makes it exact. ``d``, ``inv_d = 1/d`` (float64) and ``two32_mod_d`` may be 0-d tensors
    (compiled callers pass tensors so that one compiled kernel serves every d).
    """
    d_f = d.to(torch.float64) if isinstance(d, torch.Tensor) else float(d)
    hi = _shr(z, 32).to(torch.float64)
    lo = (z & 0xFFFFFFFF).to(torch.float64)
    t = _fmod32(hi, d_f, inv_d).to(torch.int64) * two32_mod_d + _fmod32(lo, d_f, inv_d).to(torch.int64)
    r = t - (t.to(torch.float64) * inv_d).floor().to(torch.int64) * d
    r = torch.where(r < 0, r + d, r)
    return torch.where(r >= d, r - d, r)


def group_ids(
    start: int, count: int, *, d: int, seed: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Group ids ``g(start), ..., g(start + count - 1)`` as an int64 tensor on ``device``.

    ``seed`` is any Python int (reduced modulo 2**64). The result does not depend on how a range
    is split into calls, so callers may chunk freely.

    >>> group_ids(5, 3, d=7, seed=-1).tolist()
    [6, 3, 3]
    """
    if not 0 < d < 1 << 63:
        raise ValueError(f"d must be in [1, 2**63), got {d}")
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    return _umod(_splitmix64(seed, start, count, device), d)


def group_counts(
    size: int,
    *,
    d: int,
    seed: int,
    chunk_size: int = DEFAULT_CHUNK,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Number of positions in ``[0, size)`` that fall in each of the ``d`` groups (int64, length d).

    Works chunk by chunk, so memory stays bounded by ``chunk_size`` whatever ``size`` is.

    >>> group_counts(10, d=3, seed=1).tolist()
    [2, 5, 3]
    """
    counts = torch.zeros(d, dtype=torch.int64, device=device)
    for lo in range(0, size, chunk_size):
        ids = group_ids(lo, min(chunk_size, size - lo), d=d, seed=seed, device=device)
        counts += torch.bincount(ids, minlength=d)
    return counts


def group_scales(counts: torch.Tensor, *, isometric: bool = True) -> torch.Tensor:
    """Per-group scale ``s_j``: ``1/sqrt(n_j)`` when isometric (empty groups count as 1), else 1.

    With isometric scales the columns of P are orthonormal: ``P^T P = I``.

    >>> group_scales(torch.tensor([1, 4, 0]), isometric=True).tolist()
    [1.0, 0.5, 1.0]
    """
    if not isometric:
        return torch.ones(counts.shape, dtype=torch.float32, device=counts.device)
    # sqrt and division are correctly rounded on every device (rsqrt is not on CUDA), so a scale
    # is the same bits wherever it is computed.
    return (1.0 / counts.clamp(min=1).to(torch.float64).sqrt()).to(torch.float32)
