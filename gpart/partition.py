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


def umod(z: torch.Tensor, d: int) -> torch.Tensor:
    """``z mod d`` with ``z`` read as unsigned 64-bit, for ``0 < d < 2**63``; may reuse ``z``'s memory."""
    if _is_pow2(d):  # its low bits, in place: a mask instead of a division (13 vs 180 us per 131,072)
        return z.bitwise_and_(d - 1)
    r = torch.remainder(z, d)  # floor-mod: in [0, d) for the signed value
    fix = _U64 % d  # a negative z stands for z + 2**64
    if fix:
        r = torch.remainder(r + (z < 0).to(r.dtype) * fix, d)
    return r


def _xorshift_(z: torch.Tensor, k: int, scratch: torch.Tensor | None) -> None:
    """``z ^= z >>> k`` (logical shift) in place, the shifted copy in ``scratch`` if given."""
    t = z >> k if scratch is None else torch.bitwise_right_shift(z, k, out=scratch)
    t &= (1 << (64 - k)) - 1
    z ^= t


def mix_(z: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """SplitMix64 output function, in place, on int64 bit patterns (eager and compiled alike).

    Eagerly every op is a pass over memory, and on a CPU a fresh tensor of a MiB or more is
    fresh pages from the OS (page faults, measured: most of an eager hash inside a training
    step); so the shifted copies go to one ``scratch`` tensor, masked in place. Compiled code
    passes none: Inductor fuses the whole chain into registers.
    """
    _xorshift_(z, 30, scratch)
    z *= _as_int64(_MIX1)
    _xorshift_(z, 27, scratch)
    z *= _as_int64(_MIX2)
    _xorshift_(z, 31, scratch)
    return z


def splitmix64(key: int, start: int, count: int, device: torch.device | str | None) -> torch.Tensor:
    """SplitMix64 output of ``key + start + k`` for ``k`` in ``[0, count)``, as int64 bit patterns."""
    base = hash_base(key, start)
    if base + count < 1 << 63:  # one op instead of two (almost always: base is a 64-bit hash offset)
        z = torch.arange(base, base + count, dtype=torch.int64, device=device)
    else:
        z = torch.arange(count, dtype=torch.int64, device=device)
        z += base  # wraps modulo 2**64, like uint64
    return mix_(z, torch.empty_like(z))


def hash_base(key: int, start: int) -> int:
    """The int64 that ``arange(count)`` is offset by before mixing (see :func:`splitmix64`)."""
    return _as_int64(key + start + _GOLDEN)


_MASK_MULT = _as_int64(0xD1342543DE82EF95)  # an odd multiplier with good spectral figures of merit


def mask_key(key: int) -> int:
    """A dropout key spread over all 64 bits (SplitMix64 of ``key``), as an int64."""
    z = (key + _GOLDEN) % _U64
    z = ((z ^ (z >> 30)) * _MIX1) % _U64
    z = ((z ^ (z >> 27)) * _MIX2) % _U64
    return _as_int64(z ^ (z >> 31))


def dropout_keep(z: torch.Tensor, mkey, cutoff) -> torch.Tensor:
    """The dropout keep-mask of positions whose hashes are ``z``: ``(z ^ mkey) * m >= cutoff``.

    ``z`` is the position's SplitMix64 hash (the one its group id comes from) and ``mkey`` a
    call's key spread by :func:`mask_key`, so ``z ^ mkey`` is uniform and independent from call
    to call; the odd multiplier carries every bit into the top ones. As a signed int64 the product
    is uniform over ``[-2**63, 2**63)``, so with ``cutoff = (round(p * 2**24) << 40) - 2**63`` an
    entry is dropped with probability ``p`` rounded to 2**-24: an integer comparison, exact on
    every device. Three ops per entry, none a second hash. ``mkey`` and ``cutoff`` may be 0-d
    int64 tensors.
    """
    u = z ^ mkey  # one temporary, then in place (see mix_)
    u *= _MASK_MULT
    return u >= cutoff


#: :func:`umod_fast` serves d below this bound (its proof needs it, and the compiled gather reads
#: group ids as int32).
FAST_MOD_LIMIT = 1 << 31
_TWO64 = float(_U64)
# The largest float64 below 2**63: a quotient estimate clamped to it converts to int64 exactly.
_QMAX = float((1 << 63) - (1 << 10))


def umod_fast(z: torch.Tensor, d, inv_d) -> torch.Tensor:
    """Unsigned ``z mod d`` without integer division (which has no SIMD form), for ``2 <= d < 2**31``.

    A float64 estimate of the quotient, an exact int64 remainder, one exact float64 correction.
    Why it is exact: ``z`` read as unsigned is ``u < 2**64``; its float64 image is off by less
    than ``2**11``, so with ``inv_d = fl(1/d)`` the estimate ``q = floor(u' * inv_d)`` is off by at
    most ``2**13 / d + 1`` from ``u // d``. Then ``r = z - q*d``, computed with int64 wraparound
    (the same low 64 bits as in unsigned arithmetic), is the true ``u - q*d`` since
    ``|r| < 2**13 + 2*d``, and exact in float64. There ``r * inv_d`` is within
    ``2**-52 * |r| / d`` of ``r / d``, less than the ``1/d`` that separates a non-integer ``r / d``
    from the next integer: ``floor`` is exact, or one too low when ``d`` divides ``r``, which leaves
    ``r - floor(...) * d == d``; one correction removes it. The clamp keeps ``q`` inside int64 (a
    float beyond it converts to an undefined value in C++; it binds only for d = 2). d = 1 would
    overflow ``r``: powers of two take :func:`umod_pow2`. ``d`` and ``inv_d`` may be 0-d tensors
    (compiled callers pass tensors so that one compiled kernel serves every d). Returns int64.
    """
    zf = z.to(torch.float64)
    zf = torch.where(z < 0, zf + _TWO64, zf)  # the unsigned value, approximately
    q = (zf * inv_d).floor().clamp(max=_QMAX).to(torch.int64)
    r = (z - q * d).to(torch.float64)
    d_f = d.to(torch.float64) if isinstance(d, torch.Tensor) else float(d)
    r = r - (r * inv_d).floor() * d_f
    return torch.where(r >= d_f, r - d_f, r).to(torch.int64)


#: :func:`umod_split` serves d up to this bound (its float64 integers must stay below 2**53).
SPLIT_MOD_LIMIT = 1 << 21


def umod_split(z: torch.Tensor, d, inv_d, r32) -> torch.Tensor:
    """Unsigned ``z mod d`` from the 32-bit halves of ``z``, for ``2 <= d <= 2**21``.

    About half the vector work of :func:`umod_fast` (measured: 0.42 vs 0.94 ns per entry on
    top of the hash; no 64-bit multiply, no sign fix-up). Why it is exact: with ``u = hi * 2**32
    + lo`` the unsigned value of ``z`` and ``r32 = 2**32 mod d``, ``u`` is congruent to
    ``x = hi * r32 + lo`` modulo ``d``, and ``0 <= x <= (2**32 - 1) * d < 2**53``, so ``hi``,
    ``lo``, the product and the sum are integers held exactly in float64. ``fl(x * inv_d)`` with
    ``inv_d = fl(1/d)`` is within ``2**-52 * x / d < 2**-20`` of ``x / d``, so its floor ``q`` is
    ``x // d`` or one off either way; ``x - q * d`` (integers below 2**53: exact) is then the
    remainder, or it plus or minus ``d``: one correction each way. ``d``, ``inv_d`` and ``r32``
    may be 0-d tensors (int64, float64, float64), as compiled callers pass them. Returns int64.
    """
    x = _shr(z, 32).to(torch.float64) * r32 + (z & 0xFFFFFFFF).to(torch.float64)
    d_f = d.to(torch.float64) if isinstance(d, torch.Tensor) else float(d)
    r = x - (x * inv_d).floor() * d_f
    r = torch.where(r < 0, r + d_f, r)
    return torch.where(r >= d_f, r - d_f, r).to(torch.int64)


def mod_constants(d: int) -> tuple[float, float]:
    """``(1/d, 2**32 mod d)`` as floats: the ``inv_d`` and ``r32`` of :func:`umod_fast` and
    :func:`umod_split` (computed once per d by their callers, never inside a kernel)."""
    return 1.0 / d, float((1 << 32) % d)


def mod_kind(d: int) -> str:
    """Which unsigned modulo serves ``d`` in the compiled kernels: a mask for a power of two,
    :func:`umod_split` up to 2**21, :func:`umod_fast` below 2**31, else :func:`umod` (eager)."""
    if _is_pow2(d):
        return "pow2"
    return "split" if d <= SPLIT_MOD_LIMIT else "fast" if d < FAST_MOD_LIMIT else "exact"


def umod_pow2(z: torch.Tensor, d) -> torch.Tensor:
    """Unsigned ``z mod d`` for a power of two ``d`` (1 included): its low bits."""
    return z & (d - 1)


def _is_pow2(d: int) -> bool:
    return d & (d - 1) == 0


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
    return umod(splitmix64(seed, start, count, device), d)


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

    With isometric scales the columns of P are orthonormal: ``P^T P = I``. The value is what the
    authors' implementation computes with float32 operations: ``sqrt`` rounded to float32, then
    ``1 /`` rounded to float32 (two roundings; for 580,733 sizes in 1..2,000,000 this differs in
    the last bit from ``1/sqrt(n)`` rounded once, the first being n = 6, 7, 17, 18, 21). Each
    step runs in float64 and is rounded to float32, which gives the correctly rounded float32
    result (double rounding is harmless for sqrt and division from 53 to 24 bits), so a scale is
    the same bits on every machine and device. torch's own float32 ``sqrt`` on CPU is not
    correctly rounded on every CPU (on an AVX2 machine here: 300,138 of those 2,000,000 sizes
    off by an ulp), so the reference's scales themselves vary by machine; gpart's do not.
    Returned on ``counts``'s device.

    >>> group_scales(torch.tensor([1, 4, 0]), isometric=True).tolist()
    [1.0, 0.5, 1.0]
    >>> group_scales(torch.tensor([6])).item() == 1 / 6**0.5  # float32(1/float32(sqrt(6)))
    False
    """
    if not isometric:
        return torch.ones(counts.shape, dtype=torch.float32, device=counts.device)
    root = counts.clamp(min=1).to(torch.float64).sqrt().to(torch.float32)  # sqrt, rounded to f32
    return (1.0 / root.to(torch.float64)).to(torch.float32)  # 1 / that, rounded to f32
