"""The delta path: ``W0 + reshape(P theta)`` for one target interval, and its exact gradient.

This is the one small, swappable piece that turns the partition into numbers; everything else
calls :func:`effective` (or :func:`materialize` for the bare delta). Two interchangeable kernels
compute the same bits:

* ``"eager"``: plain torch ops, chunk by chunk (bounded int64 temporaries), any device, no
  compiler needed. Cost: a dozen memory passes per entry.
* ``"compiled"``: the whole chain (hash, modulo, gather, dropout mask, add, cast) fused by
  ``torch.compile`` into one pass that reads W0 and writes W; the modulo avoids integer division
  (no SIMD form): a mask when d is a power of two, else an exact float64 quotient estimate. One
  kernel per setting (device, dtypes, dropout on/off, power of two or not) serves every target
  (dynamic shapes, scalars passed as tensors). Falls back to eager for d >= 2**31.

Forward:  ``W[k] = W0[k] + theta[g] * s[g] * (m[k] * r)``, with ``g = g(start + k)``, the keep-mask
          ``m`` (all ones without dropout) and ``r = float32(1 / (1 - p))``, added in float32
          (float64 for float64 weights) and rounded once to W0's dtype.
Backward: ``grad_theta[j] = s[j] * sum_{k in group j} grad_W[k] * m[k] * r`` (``P^T grad``), a
          scatter-add in entry order, of each half of a large target on CPU (see :func:`_parts`).

Group ids and the mask are *regenerated* from integers in backward, never saved: nothing whose
size grows with D is kept for backward.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import os
import re
import tempfile
import types
import warnings
from pathlib import Path

import torch

from . import _version
from .partition import (
    DEFAULT_CHUNK,
    FAST_MOD_LIMIT,
    dropout_keep,
    group_counts,
    hash_base,
    mask_key,
    mix_,
    mod_constants,
    mod_kind,
    splitmix64,
    umod,
    umod_fast,
    umod_pow2,
    umod_split,
)

__all__ = [
    "BACKENDS",
    "IdsHandoff",
    "compile_cache_warm",
    "compiled_available",
    "count_groups",
    "effective",
    "keep_mask",
    "keep_mask_traced",
    "materialize",
    "recompute",
    "traced",
]

BACKENDS = ("eager", "compiled")
_BACKWARD_CHUNK = 1 << 22


def _cutoff(p: float) -> int:
    """The int64 that :func:`gpart.partition.dropout_keep` compares with for dropout ``p``."""
    return (round(p * (1 << 24)) << 40) - (1 << 63)


@torch.compiler.assume_constant_result  # traced code (see traced) sees a constant, not .item()
def dropout_scale(p: float) -> float:
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def _acc_dtype(w0_dtype: torch.dtype, table_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.promote_types(w0_dtype, table_dtype), torch.float32)


# ------------------------------------------------------------------------------------------ eager


def _eager_hash_keep(start, n, seed, p, key, device):
    """The hashes of ``n`` positions and their keep-mask (None without dropout)."""
    z = splitmix64(seed, start, n, device)
    return z, (dropout_keep(z, mask_key(key), _cutoff(p)) if p > 0.0 else None)


def keep_mask(start: int, n: int, seed: int, p: float, key: int, device) -> torch.Tensor:
    """The dropout keep-mask of positions ``[start, start + n)`` for key ``key`` (eager)."""
    return _eager_hash_keep(start, n, seed, p, key, device)[1]


def keep_mask_traced(n: int, base: torch.Tensor, p: float, *, device) -> torch.Tensor:
    """:func:`keep_mask` in tensor ops with a fresh key drawn on the device, for ``torch.compile``."""
    key = torch.randint(0, 1 << 62, (), device=device)
    mkey = mix_(key + hash_base(0, 0))
    return _fused_ids_keep(n, device, base, 1, 1.0, 0.0, mkey, _cutoff(p), True, "pow2")[1]


def _eager_forward(w0, table, start, d, seed, p, key, chunk, keep_ids=None):
    flat = w0.reshape(-1)
    one = 0 < flat.numel() <= chunk
    out = None if one else torch.empty_like(flat)  # one chunk: its sum is the output, no copy
    handed, dropped = [], None
    for lo in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - lo)
        z, keep = _eager_hash_keep(start + lo, n, seed, p, key, w0.device)
        ids = umod(z, d)
        if keep is not None:  # dropped entries read a 0 appended to the table: one op, not three
            ids = torch.where(keep, ids, d)
            if dropped is None:
                dropped = torch.cat([table * dropout_scale(p), table.new_zeros(1)])
        # index_select, not table[ids]: the same copy, 2-3.5x faster for 1-D tables (measured,
        # 4,096 to 1M entries; advanced indexing goes through a generic strided kernel).
        part = torch.index_select(table if keep is None else dropped, 0, ids)
        if out is None:
            out = add_delta(flat, part)
        else:
            out[lo : lo + n] = add_delta(flat[lo : lo + n], part)
        if keep_ids is not None:
            handed.append(ids)
    if keep_ids is not None:
        keep_ids(handed[0] if len(handed) == 1 else torch.cat(handed))
    return out.view(w0.shape)


def _eager_segment_sum(grad, start, d, seed, p, key, chunk, dtype):
    flat = grad.reshape(-1)

    def pieces(lo, hi):
        for a in range(lo, hi, chunk):
            n = min(chunk, hi - a)
            part = flat[a : a + n].to(dtype)
            z, keep = _eager_hash_keep(start + a, n, seed, p, key, flat.device)
            if keep is not None:
                part = torch.where(keep, part * dropout_scale(p), 0.0)
            yield umod(z, d), part

    return _sum_in_parts(flat.numel(), d, d, dtype, flat.device, pieces)


# A segment sum on CPU is serial: one random read-modify-write per entry. A large target is
# therefore summed in two halves, each serially in entry order, and then the halves are added:
# ``scatter_add`` over two rows runs the halves on two threads (measured: 1.6x faster than one
# serial ``bincount`` for 1M entries into 131,072 groups). The split depends on the sizes only,
# never on the thread count, so the bits are the same on every machine and in every kernel.
_SPLIT_MIN = 1 << 16


def _parts(n: int, d: int, device: torch.device) -> int:
    """Into how many equal parts the segment sum of ``n`` entries into ``d`` groups is split.

    Two for large, even ``n`` on CPU (a part costs a d-sized accumulator, so only when
    ``n >= d``); one elsewhere (CUDA adds with atomics in any order anyway).
    """
    return 2 if device.type == "cpu" and n % 2 == 0 and n >= max(d, _SPLIT_MIN) else 1


def _sum_in_parts(n: int, d: int, length: int, dtype: torch.dtype, device: torch.device, pieces):
    """The segment sum of ``n`` entries, from ``pieces(lo, hi)``: ``(ids, values)`` chunks of
    ``[lo, hi)`` in order. Each part of :func:`_parts` is summed serially, then the parts in order."""
    parts = _parts(n, d, device)
    m = n // parts
    sums = [_scatter_sum(pieces(r * m, (r + 1) * m), length, dtype, device) for r in range(parts)]
    return functools.reduce(torch.add, sums)


def _sum_whole(ids: torch.Tensor, values: torch.Tensor, d: int, length: int) -> torch.Tensor:
    """:func:`_sum_in_parts` from the ids and values of all entries at once: the parts in parallel."""
    parts = _parts(ids.numel(), d, ids.device)
    if parts == 1:
        return _scatter_sum([(ids, values)], length, values.dtype, values.device)
    rows = values.new_zeros(parts, length).scatter_add(1, ids.view(parts, -1).long(), values.view(parts, -1))
    return functools.reduce(torch.add, rows.unbind(0))


def _scatter_sum(pieces, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``(ids, values)`` pieces added into ``length`` zeros, one entry after another, in order.

    On CPU the first piece is a weighted ``bincount``: the same serial loop, order and bits as
    ``index_add_``, without its per-entry bounds and stride handling (measured: 1.75x faster).
    """
    sums = None
    for ids, values in pieces:
        fast = ids.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)
        if sums is None and fast and not values.requires_grad:  # bincount has no derivative
            sums = torch.bincount(ids, weights=values, minlength=length)
        else:
            if sums is None:
                sums = torch.zeros(length, dtype=values.dtype, device=values.device)
            sums.index_add_(0, ids, values)
    return sums if sums is not None else torch.zeros(length, dtype=dtype, device=device)


def _segment_sum_of_ids(grad, ids, d, p, dtype):
    """The segment sum with the group ids handed over by a recompute (dropped entries carry id
    ``d``), for either kernel. The same bits as regenerating the ids: a dropped entry adds +0.0
    there, which never changes a sum that starts at +0.0."""
    values = grad.reshape(-1).to(dtype)
    if p > 0.0:
        values = values * dropout_scale(p)
    return _sum_whole(ids, values, d, d + 1)[:d]


# --------------------------------------------------------------------------------------- compiled


def _fused_ids_keep(n, device, base, d, inv_d, r32, mkey, cutoff, dropout: bool, mod: str):
    """Group ids (int64) and the keep-mask (None without dropout) of ``n`` consecutive positions.

    ``dropout`` (a bool) and ``mod`` (:func:`gpart.partition.mod_kind` of d) are static, so
    each combination is its own compiled kernel; ``inv_d = 1/d`` and ``r32 = 2**32 mod d`` are
    float64 constants of the modulo; ``mkey`` and ``cutoff`` those of :func:`gpart.partition.dropout_keep`.
    """
    z = mix_(torch.arange(n, dtype=torch.int64, device=device) + base)
    keep = dropout_keep(z, mkey, cutoff) if dropout else None
    if mod == "pow2":
        ids = umod_pow2(z, d)
    elif mod == "split":
        ids = umod_split(z, d, inv_d, r32)
    elif mod == "fast":
        ids = umod_fast(z, d, inv_d)
    else:  # d >= 2**31: only from `traced`, which has d as an int
        ids = umod(z, d)
    return ids, keep


def _fused_forward(w0, table, base, d, inv_d, r32, mkey, cutoff, keep_scale, dropout: bool, mod: str):
    return _fused_forward_ids(w0, table, base, d, inv_d, r32, mkey, cutoff, keep_scale, dropout, mod)[0]


def _fused_forward_ids(w0, table, base, d, inv_d, r32, mkey, cutoff, keep_scale, dropout: bool, mod: str):
    """``W0 + delta`` and the int64 group ids (dropped entries: ``d``); inductor drops what is unused."""
    ids, keep = _fused_ids_keep(w0.numel(), w0.device, base, d, inv_d, r32, mkey, cutoff, dropout, mod)
    # ids are in [0, d) by construction (tested bit for bit against the eager kernel): the unsafe
    # gather lets inductor drop its per-entry bounds check (measured: -20% of the whole kernel).
    # The index width is measured, not derived (torch 2.13, AVX-512 CPU, same generated loop but
    # for the width): after the all-64-bit modulo ("fast") int32 ids made the kernel 1.6x faster;
    # after the mask and the split modulo, int32 made it slower (1.5x for "split"). int32 is exact
    # for d < 2**31.
    part = torch.ops.aten._unsafe_index(table, [ids.to(torch.int32) if mod == "fast" else ids])
    if keep is not None:
        part = torch.where(keep, part * keep_scale, 0.0)
        ids = torch.where(keep, ids, d)
    return add_delta(w0, part), ids  # int64: what scatter_add takes (a conversion would be one more pass)


def add_delta(w0: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``W0 + part`` (both flat) in the accumulation dtype, rounded once to W0's dtype.

    Compiled callers pass flat tensors: a reshape round trip inside the graph makes inductor's
    dynamic-shape indexing far slower (measured: 1.7x the time of the whole kernel).
    """
    acc = _acc_dtype(w0.dtype, part.dtype)
    return (w0.to(acc) + part.to(acc)).to(w0.dtype)


def _fused_ids_into(out, base, d, inv_d, r32, mod: str):
    """The group ids of ``out.numel()`` positions, written into ``out`` (int64).

    Into a buffer reused for every chunk: a fresh 32 MiB output per call is a fresh mapping from
    the OS, whose page faults cost 5x the kernel itself (measured, 4M-entry chunks).
    """
    out.copy_(_fused_ids_keep(out.numel(), out.device, base, d, inv_d, r32, None, None, False, mod)[0])


def _fused_ids_values(
    grad, dtype: torch.dtype, base, d, inv_d, r32, mkey, cutoff, keep_scale, dropout: bool, mod: str
):
    ids, keep = _fused_ids_keep(grad.numel(), grad.device, base, d, inv_d, r32, mkey, cutoff, dropout, mod)
    values = grad.to(dtype)
    if keep is not None:
        values = torch.where(keep, values * keep_scale, 0.0)
    return ids, values


_compiled: dict[tuple, object] = {}
_KERNEL_FNS = {
    "forward": _fused_forward,
    "forward_ids": _fused_forward_ids,
    "ids_into": _fused_ids_into,
    "ids_values": _fused_ids_values,
}


def _compiled_fn(name: str, *setting):
    """The compiled kernel ``name`` for one ``setting`` (device, dtypes, dropout on/off, kind of modulo).

    Dynamo keeps at most ``recompile_limit`` (8) graphs per code object and, with
    ``fullgraph=True``, fails beyond that; dtypes x dropout x kind of modulo exceed it. So each
    setting compiles its own copy of the function's code object, with a cache of its own.
    """
    key = (name, *setting)
    if key not in _compiled:
        fn = _KERNEL_FNS[name]
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
        # No `options=` (e.g. to drop bounds checks): with any inductor config patch these CPU
        # kernels ran at one-thread speed (torch 2.13: 2.2 vs 1.2 ns per entry, same generated C++).
        _compiled[key] = torch.compile(own, dynamic=True, fullgraph=True)
    return _compiled[key]


def _scalars(start, d, seed, p, key, device, table_dtype):
    """The per-call integers as 0-d tensors, so that one compiled kernel serves every call:
    ``(base, d, inv_d, r32, mkey, cutoff, keep_scale)``.

    All but the dropout key come from a per-target cache (:func:`_static_scalars`). The key
    changes at every training forward; it becomes a tensor through a fill, whose value is a kernel
    argument: never a host to device copy, so the host never waits for the device.
    """
    base, d_t, inv_d, r32, zero, cutoff, keep_scale = _static_scalars(start, d, seed, p, device, table_dtype)
    mkey = zero if p == 0.0 else torch.full((), mask_key(key), dtype=torch.int64, device=device)
    return base, d_t, inv_d, r32, mkey, cutoff, keep_scale


@functools.lru_cache(maxsize=4096)
def _static_scalars(start, d, seed, p, device, table_dtype):
    """The scalars of one target that do not change from call to call, built once.

    On a GPU building a tensor from a Python number is a host to device copy that makes the host
    wait for the device (measured: the largest per-target cost of a bf16 Qwen2-0.5B step on an
    H200), so they are built once per (target, setting), never per call.
    """
    device = torch.device(device)
    i64 = {"dtype": torch.int64, "device": device}
    with torch.inference_mode(False):
        return (
            torch.tensor(hash_base(seed, start), **i64),
            torch.tensor(d, **i64),
            *(torch.tensor(c, dtype=torch.float64, device=device) for c in mod_constants(d)),
            torch.tensor(0, **i64),
            torch.tensor(_cutoff(p), **i64),
            torch.tensor(dropout_scale(p) if p > 0 else 1.0, dtype=table_dtype, device=device),
        )


def _compiled_forward(w0, table, start, d, seed, p, key, chunk, keep_ids=None):
    if d >= FAST_MOD_LIMIT:
        return _eager_forward(w0, table, start, d, seed, p, key, chunk)
    scalars = _scalars(start, d, seed, p, key, w0.device, table.dtype)
    flat = w0.reshape(-1)
    static = (p > 0.0, mod_kind(d))
    setting = (flat.device, flat.dtype, table.dtype, *static)
    if keep_ids is None:
        return _compiled_fn("forward", *setting)(flat, table, *scalars, *static).view(w0.shape)
    out, ids = _compiled_fn("forward_ids", *setting)(flat, table, *scalars, *static)
    keep_ids(ids)
    return out.view(w0.shape)


def _compiled_segment_sum(grad, start, d, seed, p, key, chunk, dtype):
    flat = grad.reshape(-1)
    if d >= FAST_MOD_LIMIT:
        return _eager_segment_sum(grad, start, d, seed, p, key, chunk, dtype)
    static = (p > 0.0, mod_kind(d))
    kernel = _compiled_fn("ids_values", flat.device, flat.dtype, dtype, *static)

    def run(lo, hi):
        return kernel(flat[lo:hi], dtype, *_scalars(start + lo, d, seed, p, key, flat.device, dtype), *static)

    step = max(chunk, _BACKWARD_CHUNK)  # bounds the int64 ids per call
    if flat.numel() <= step:
        return _sum_whole(*run(0, flat.numel()), d, d)
    return _sum_in_parts(
        flat.numel(),
        d,
        d,
        dtype,
        flat.device,
        lambda lo, hi: (run(a, min(a + step, hi)) for a in range(lo, hi, step)),
    )


def count_groups(
    size: int, *, d: int, seed: int, backend: str, device, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Group sizes over ``[0, size)`` (int64, length d): :func:`gpart.partition.group_counts`,
    with the group ids generated by the chosen kernel."""
    if backend == "eager" or d >= FAST_MOD_LIMIT:
        return group_counts(size, d=d, seed=seed, chunk_size=chunk, device=device)
    counts = torch.zeros(d, dtype=torch.int64, device=device)
    kind = mod_kind(d)
    kernel = _compiled_fn("ids_into", torch.device(device), kind)
    ids = torch.empty(min(chunk, size), dtype=torch.int64, device=device)
    for lo in range(0, size, chunk):
        base, d_t, inv_d, r32, *_ = _scalars(lo, d, seed, 0.0, 0, device, torch.float32)
        n = min(chunk, size - lo)
        # A short last chunk gets its own buffer: a view of `ids` would fail Dynamo's guard on
        # the view's base size and recompile the kernel (measured: 0.4 s, once per process).
        part = ids if n == ids.numel() else torch.empty(n, dtype=torch.int64, device=device)
        kernel(part, base, d_t, inv_d, r32, kind)
        counts += _count(part, d)
    return counts


def _count(ids: torch.Tensor, d: int) -> torch.Tensor:
    """``bincount(ids, minlength=d)``; on CPU two halves on two threads (as :func:`_sum_whole`).

    Counts are integers, so the split changes nothing: each half adds float32 ones (exact while a
    half holds at most 2**24 entries; measured 1.4-2x faster than ``bincount`` into 131,072
    groups, whose loop is serial), and the halves are converted before they are added.
    """
    n = ids.numel()
    parts = _parts(n, d, ids.device)
    if parts == 1 or n > parts << 24:
        return torch.bincount(ids, minlength=d)
    one = torch.ones((), dtype=torch.float32, device=ids.device)
    rows = torch.zeros(parts, d, dtype=torch.float32, device=ids.device)
    rows.scatter_add_(1, ids.view(parts, -1), one.expand(parts, n // parts))
    return rows.long().sum(0)


_KERNELS = {
    "eager": (_eager_forward, _eager_segment_sum),
    "compiled": (_compiled_forward, _compiled_segment_sum),
}


def compiled_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernel builds and runs on ``device`` (tried once per device type).

    On success it leaves a marker in the compile cache (:func:`compile_cache_warm`).
    """
    kind = torch.device(device).type
    if kind not in _available:
        try:
            w0 = torch.zeros(8, device=device)
            table = torch.ones(3, device=device)
            ok = torch.equal(_compiled_forward(w0, table, 0, 3, 0, 0.0, 0, DEFAULT_CHUNK), w0 + 1)
        except Exception as err:  # no C++ compiler or Triton, unsupported platform, ...
            warnings.warn(f"gpart: compiled kernel unavailable on {kind} ({err}); using eager", stacklevel=2)
            ok = False
        _available[kind] = ok
        if ok:
            with contextlib.suppress(OSError):  # a read-only cache only costs the next start
                _warm_marker(kind).touch()
    return _available[kind]


def compile_cache_warm(device: torch.device | str = "cpu") -> bool:
    """Whether gpart's kernels were compiled before into the compile cache this process uses.

    Compiling with a cold cache costs ~9 s on 2 CPU cores, with a warm one ~2.5 s (Inductor still
    traces, then loads the code it generated before). Told by a marker that
    :func:`compiled_available` writes into Inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR``, by
    default ``<tmp>/torchinductor_<user>``; importing Inductor to ask would cost 1.4 s): clearing
    the cache clears the marker. One marker per gpart version, torch version and device type.
    """
    return _warm_marker(torch.device(device).type).is_file()


def _warm_marker(kind: str) -> Path:
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if folder is None:  # Inductor's default (torch/_inductor/runtime/cache_dir_utils.py)
        try:
            user = getpass.getuser()
        except (KeyError, ModuleNotFoundError, OSError):
            user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
        folder = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    return Path(folder) / f"gpart-{_version.__version__}-torch-{torch.__version__}-{kind}.warm"


_available: dict[str, bool] = {}


# ---------------------------------------------------------------------------------------- autograd


class IdsHandoff:
    """Group ids computed by backward's recompute of a weight, kept for that weight's segment sum.

    Backward first rebuilds ``W0 + delta`` (the consumer layer needs it for the input gradient),
    then needs the group ids again for ``P^T grad``; the compiled kernel hands its ids over here
    instead of hashing twice. Entries are keyed by the call's interval of its index space (seed,
    start, length: two block-scope partitions have positions in common) and dropout key, and taken
    (removed) by the segment sum.
    """

    def __init__(self) -> None:
        self.ids: dict[tuple[int, int, int, int], torch.Tensor] = {}

    def put(self, seed: int, start: int, numel: int, key: int):
        return lambda ids: self.ids.__setitem__((seed, start, numel, key), ids)

    def take(self, seed: int, start: int, numel: int, key: int) -> torch.Tensor | None:
        return self.ids.pop((seed, start, numel, key), None)


class _Effective(torch.autograd.Function):
    """``W0 + reshape(P theta)`` forward; the segment sum ``P^T grad`` backward (theta only)."""

    @staticmethod
    def forward(ctx, theta, scale, w0, start, seed, p, key, backend, chunk, handoff):
        forward, _ = _KERNELS[backend]
        out = forward(w0, theta * scale, start, theta.numel(), seed, p, key, chunk)
        ctx.save_for_backward(scale)  # d values: not D-sized
        ctx.args = (start, theta.numel(), seed, p, key, chunk, theta.dtype)
        ctx.backend, ctx.handoff = backend, handoff
        return out

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        start, d, seed, p, key, chunk, dtype = ctx.args
        grad_theta = None
        if ctx.needs_input_grad[0]:
            _, segment_sum = _KERNELS[ctx.backend]
            ids = ctx.handoff.take(seed, start, grad.numel(), key) if ctx.handoff is not None else None
            if ids is None:
                grad_theta = segment_sum(grad, start, d, seed, p, key, chunk, dtype) * scale
            else:  # handed over by the recompute of this very weight: no second hash pass
                grad_theta = _segment_sum_of_ids(grad, ids, d, p, dtype) * scale
        # d(W0 + delta)/dW0 = I: W0 needs a gradient only as another adapter's output (a chain)
        grad_w0 = grad if ctx.needs_input_grad[2] else None
        return grad_theta, None, grad_w0, None, None, None, None, None, None, None


def _stored_ids(ids, n, d, start, seed, p, key, device):
    """Stored ``ids`` as int64, with dropout's dropped entries pointing at slot ``d``."""
    idx = ids.to(device, torch.int64)
    return idx if p <= 0.0 else torch.where(keep_mask(start, n, seed, p, key, device), idx, d)


class _StoredEffective(torch.autograd.Function):
    """:class:`_Effective` for ids stored at apply (the generator and signed-magnitude assignments):
    a gather forward, a segment sum backward; the dropout mask still comes from the position hash."""

    @staticmethod
    def forward(ctx, theta, scale, w0, ids, start, seed, p, key):
        flat, table = w0.reshape(-1), theta * scale
        idx = _stored_ids(ids, flat.numel(), table.numel(), start, seed, p, key, w0.device)
        if p > 0.0:  # dropped entries read a 0 appended to the table
            table = torch.cat([table * dropout_scale(p), table.new_zeros(1)])
        ctx.save_for_backward(scale)
        ctx.ids, ctx.args = ids, (start, seed, p, key, theta.dtype)  # ids: the stored buffer itself
        return add_delta(flat, torch.index_select(table, 0, idx)).view(w0.shape)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        start, seed, p, key, dtype = ctx.args
        grad_theta, grad_w0 = None, grad if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[0]:
            d = scale.numel()
            idx = _stored_ids(ctx.ids, grad.numel(), d, start, seed, p, key, grad.device)
            grad_theta = _segment_sum_of_ids(grad, idx, d, p, dtype) * scale
        return grad_theta, None, grad_w0, *(None,) * 5


def effective(
    w0: torch.Tensor,
    theta: torch.Tensor,
    scale: torch.Tensor,
    *,
    start: int,
    seed: int,
    dropout: float = 0.0,
    dropout_key: int = 0,
    backend: str = "eager",
    chunk: int = DEFAULT_CHUNK,
    handoff: IdsHandoff | None = None,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W0 + reshape(P theta)`` over ``[start, start + W0.numel())``, in W0's dtype; differentiable in theta.

    ``dropout_key`` selects the dropout mask (ignored when ``dropout == 0``); the same key always
    gives the same mask, which is how backward reproduces it without storing it. A frozen ``w0``
    gets no gradient; one that requires it (another adapter's output, when several adapters are
    stacked on a tensor) gets the incoming gradient unchanged. ``handoff`` lets backward reuse the
    group ids of a recompute (see :func:`recompute`). ``ids``: group ids stored at apply (see
    :mod:`gpart.assignment`) instead of the hash; ``backend`` is then irrelevant.
    """
    if ids is not None:
        return _StoredEffective.apply(
            theta, scale.to(theta.dtype), w0, ids, start, seed, dropout, dropout_key
        )
    return _Effective.apply(
        theta, scale.to(theta.dtype), w0, start, seed, dropout, dropout_key, backend, chunk, handoff
    )


def recompute(
    w0: torch.Tensor,
    theta: torch.Tensor,
    scale: torch.Tensor,
    *,
    start: int,
    seed: int,
    dropout: float,
    dropout_key: int,
    backend: str,
    handoff: IdsHandoff | None,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The value of :func:`effective` again (no autograd), handing the group ids to ``handoff``.

    The eager kernel hands its ids over only up to :data:`_BACKWARD_CHUNK` entries: beyond that
    the segment sum regenerates them chunk by chunk rather than hold 8 bytes per entry.
    """
    if ids is not None:
        with torch.no_grad():
            return effective(
                w0, theta, scale, start=start, seed=seed, dropout=dropout, dropout_key=dropout_key, ids=ids
            )
    forward, _ = _KERNELS[backend]
    hand = handoff is not None and (backend == "compiled" or w0.numel() <= _BACKWARD_CHUNK)
    keep = handoff.put(seed, start, w0.numel(), dropout_key) if hand else None
    with torch.no_grad():
        return forward(
            w0,
            theta * scale.to(theta.dtype),
            start,
            theta.numel(),
            seed,
            dropout,
            dropout_key,
            DEFAULT_CHUNK,
            keep,
        )


def traced(
    w0: torch.Tensor,
    theta: torch.Tensor,
    scale: torch.Tensor,
    *,
    base: torch.Tensor,
    start: int,
    dropout: float = 0.0,
    dropout_key: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`effective` in plain differentiable torch ops, for ``torch.compile`` to trace.

    No custom autograd Function, no Python-side state, no host sync: ``base`` (the hash offset,
    ``hash_base(seed, start)``) and the dropout key are 0-d int64 tensors. Dynamo traces it
    without graph breaks, AOTAutograd derives the segment sum (the gather's backward), and
    Inductor fuses it and chooses what to recompute. Same formula and rounding as the eager
    kernel, so the same values.
    """
    d = theta.numel()
    on = dropout > 0.0
    if ids is not None:  # stored ids: a gather; the mask, if any, from the position hash
        part = (theta * scale)[ids.to(torch.int64)]
        if on:
            mkey = mix_(dropout_key + hash_base(0, 0))
            _, keep = _fused_ids_keep(
                w0.numel(), w0.device, base, d, *mod_constants(d), mkey, _cutoff(dropout), True, mod_kind(d)
            )
            part = torch.where(keep, part * dropout_scale(dropout), 0.0)
        return add_delta(w0.reshape(-1), part).view(w0.shape)
    out = _fused_forward(  # the compiled kernel's formula, here differentiated by AOTAutograd
        w0.reshape(-1),
        theta * scale,
        base,
        d,
        *mod_constants(d),
        mix_(dropout_key + hash_base(0, 0)) if on else None,  # mask_key, in tensor ops
        _cutoff(dropout) if on else None,
        dropout_scale(dropout) if on else 1.0,
        on,
        mod_kind(d),
    )
    return out.view(w0.shape)


def materialize(
    theta: torch.Tensor,
    scale: torch.Tensor,
    *,
    start: int,
    numel: int,
    seed: int,
    dropout: float = 0.0,
    dropout_key: int = 0,
    backend: str = "eager",
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """The bare flat delta ``(P theta)[start : start + numel]`` in theta's dtype (tests, analysis)."""
    zeros = torch.zeros(numel, dtype=theta.dtype, device=theta.device)
    return effective(
        zeros,
        theta,
        scale,
        start=start,
        seed=seed,
        dropout=dropout,
        dropout_key=dropout_key,
        backend=backend,
        chunk=chunk,
    )
