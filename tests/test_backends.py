"""The compiled kernel computes the same bits as the eager one; the division-free modulo is exact."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gpart
import gpart.core
from gpart import _delta
from gpart.partition import (
    FAST_MOD_LIMIT,
    SPLIT_MOD_LIMIT,
    group_ids,
    mod_kind,
    umod,
    umod_fast,
    umod_pow2,
    umod_split,
)

INT64 = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=500, deadline=None)
@given(z=st.lists(INT64, min_size=1, max_size=32), d=st.integers(2, FAST_MOD_LIMIT - 1))
def test_division_free_modulo_is_exact(z, d):
    zt = torch.tensor(z, dtype=torch.int64)
    inv = torch.tensor(1.0 / d, dtype=torch.float64)
    assert torch.equal(umod_fast(zt, torch.tensor(d), inv), umod(zt, d))


# The quotient estimate is worst where z/d sits just below an integer, for large z and tiny or huge d.
EDGES = [0, 1, -1, 2**63 - 1, -(2**63), 2**32 - 1, 2**32, 2**53, 2**53 + 1, -(2**53) - 1, -1025, -1024]


@pytest.mark.parametrize("d", [2, 3, 5, 641, 2**20 + 7, 23040, 2**31 - 1, 2**31 - 2, 3 * 2**29])
def test_division_free_modulo_at_the_edges(d):
    near = [m - k for m in (2**64 // d * d, 2**63 // d * d, 2**62 // d * d) for k in (-2, -1, 0, 1, 2)]
    values = [v - 2**64 if v >= 2**63 else v for v in [v % 2**64 for v in near]]
    zt = torch.tensor(EDGES + values + [d - 1, d, -d] + list(range(-50, 50)), dtype=torch.int64)
    inv = torch.tensor(1.0 / d, dtype=torch.float64)
    assert torch.equal(umod_fast(zt, d, inv), umod(zt, d))


@settings(max_examples=500, deadline=None)
@given(z=st.lists(INT64, min_size=1, max_size=32), d=st.integers(2, SPLIT_MOD_LIMIT))
def test_split_modulo_is_exact(z, d):
    zt = torch.tensor(z, dtype=torch.int64)
    inv = torch.tensor(1.0 / d, dtype=torch.float64)
    r32 = torch.tensor(float(2**32 % d), dtype=torch.float64)
    assert torch.equal(umod_split(zt, torch.tensor(d), inv, r32), umod(zt, d))


@pytest.mark.parametrize("d", [2, 3, 5, 641, 23040, 2**20 + 7, 2**21 - 1, 2**21, 2**21 - 2**11 + 1])
def test_split_modulo_at_the_edges(d):
    """Where x = hi * (2**32 mod d) + lo is largest, and next to multiples of d in both halves."""
    near = [m - k for m in (2**64 // d * d, 2**63 // d * d, 2**32 // d * d) for k in (-2, -1, 0, 1, 2)]
    top = [(2**32 - 1) << 32 | lo for lo in (0, 1, d - 1, 2**32 - 1)]  # hi at its maximum
    values = [v - 2**64 if v >= 2**63 else v for v in [v % 2**64 for v in near + top]]
    zt = torch.tensor(EDGES + values + [d - 1, d, -d] + list(range(-50, 50)), dtype=torch.int64)
    inv = torch.tensor(1.0 / d, dtype=torch.float64)
    assert torch.equal(umod_split(zt, d, inv, float(2**32 % d)), umod(zt, d))


@pytest.mark.parametrize(("d", "lo", "fix"), [(2093152, 250495, "add d"), (2093157, 613293, "subtract d")])
def test_split_modulo_needs_both_corrections(d, lo, fix):
    """Found by search: with hi = 2**32 - 1 the float64 quotient is one too high (remainder -1
    before the fix) or one too low (remainder d), so each correction is exercised."""
    z = ((2**32 - 1) << 32 | lo) - 2**64  # the int64 bit pattern
    x = (2**32 - 1) * (2**32 % d) + lo
    r = x - math.floor(float(x) * (1.0 / d)) * d
    assert r == (-1 if fix == "add d" else d)
    zt = torch.tensor([z], dtype=torch.int64)
    inv = torch.tensor(1.0 / d, dtype=torch.float64)
    assert torch.equal(umod_split(zt, d, inv, float(2**32 % d)), umod(zt, d))


def test_modulo_kind_boundaries():
    kinds = {d: mod_kind(d) for d in (1, 2, 3, 2**21 - 1, 2**21, 2**21 + 1, 2**31 - 1, 2**31, 2**31 + 1)}
    assert kinds == {
        1: "pow2",
        2: "pow2",
        3: "split",
        2**21 - 1: "split",
        2**21: "pow2",
        2**21 + 1: "fast",
        2**31 - 1: "fast",
        2**31: "pow2",
        2**31 + 1: "exact",
    }


@given(z=st.lists(INT64, min_size=1, max_size=32), k=st.integers(0, 62))
def test_power_of_two_modulo_is_the_low_bits(z, k):
    zt = torch.tensor(z, dtype=torch.int64)
    assert torch.equal(umod_pow2(zt, 2**k), umod(zt, 2**k))


compiled = pytest.mark.skipif(
    not _delta.compiled_available(), reason="torch.compile cannot build kernels here"
)


def _need_compiled(device: str) -> None:
    if not _delta.compiled_available(device):
        pytest.skip(f"torch.compile cannot build kernels for {device} here")


@compiled
def test_compiled_split_modulo_at_the_edges():
    """Inductor's C++ (fast-math flags, contractions) keeps the exact integers in float64."""
    kernel = torch.compile(umod_split, dynamic=True, fullgraph=True)
    for d, lo in [(2093152, 250495), (2093157, 613293), (23040, 0), (3, 2**32 - 1)]:
        zt = torch.tensor([*EDGES, ((2**32 - 1) << 32 | lo) - 2**64, *range(-50, 50)], dtype=torch.int64)
        inv = torch.tensor(1.0 / d, dtype=torch.float64)
        r32 = torch.tensor(float(2**32 % d), dtype=torch.float64)
        assert torch.equal(kernel(zt, torch.tensor(d), inv, r32), umod(zt, d))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "dropout"), [(torch.float32, 0.0), (torch.float32, 0.3), (torch.bfloat16, 0.0)]
)
def test_compiled_matches_eager_bit_for_bit(dtype, dropout, device):
    _need_compiled(device)
    torch.manual_seed(0)
    for d, seed, start, shape in [
        (7, -1, 5, (3, 5)),
        (1000, 2**64 + 5, 2**40, (37, 29)),
        (23040, 0, 0, (64, 64)),
        (4096, 11, 2**33, (50, 30)),  # powers of two take the mask
        (1, 3, 9, (4, 4)),
    ]:
        _assert_kernels_agree(d, seed, start, shape, dtype, dropout, device)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_matches_eager_above_the_split_modulo(device):
    """d above 2**21, not a power of two: the float64 quotient of all 64 bits (one setting: the
    dtype and dropout variants share everything but the modulo with the test above)."""
    _need_compiled(device)
    _assert_kernels_agree(2**21 + 3, 5, 2**50, (40, 40), torch.float32, 0.0, device)


def _assert_kernels_agree(d, seed, start, shape, dtype, dropout, device):
    w0 = torch.randn(shape).to(device, dtype)
    scale = torch.rand(d, device=device)
    grads = []
    outs = []
    for backend in ("eager", "compiled"):
        theta = torch.randn(d, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
        out = _delta.effective(
            w0, theta, scale, start=start, seed=seed, dropout=dropout, dropout_key=99, backend=backend
        )
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).view(shape).to(dtype))
        outs.append(out)
        grads.append(theta.grad)
    assert torch.equal(outs[0], outs[1])
    if device == "cpu":
        assert torch.equal(grads[0], grads[1])
    else:  # CUDA's index_add_ sums with atomics: the order, hence the last bits, vary run to run
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@compiled
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(300, 500), (301, 499), (100, 64)])
def test_large_segment_sums_agree_bit_for_bit(dropout, shape, monkeypatch):
    """Eager (chunked: bincount, then index_add_), compiled (ids regenerated) and compiled (ids
    handed over: one scatter_add over the parts) add the same entries in the same order: the
    same bits. (300, 500) is summed in two halves, (301, 499) (odd) and (100, 64) (small) in one."""
    d, start, seed, key = 1000, 12345, 7, 99
    grad = torch.randn(shape)
    handoff = _delta.IdsHandoff()
    w0, theta, scale = torch.zeros(shape), torch.zeros(d), torch.ones(d)
    _delta.recompute(
        w0,
        theta,
        scale,
        start=start,
        seed=seed,
        dropout=dropout,
        dropout_key=key,
        backend="compiled",
        handoff=handoff,
    )
    args = (start, d, seed, dropout, key, 1 << 14, torch.float32)
    eager = _delta._eager_segment_sum(grad, *args)
    assert torch.equal(_delta._compiled_segment_sum(grad, *args), eager)
    assert torch.equal(
        _delta._segment_sum_of_ids(
            grad, handoff.take(seed, start, grad.numel(), key), d, dropout, torch.float32
        ),
        eager,
    )
    monkeypatch.setattr(_delta, "_BACKWARD_CHUNK", 1 << 12)  # compiled, ids regenerated in many calls
    assert torch.equal(_delta._compiled_segment_sum(grad, *args), eager)
    if dropout == 0.0:  # the oracle: each part one serial scatter-add over its entries, then the parts
        n = grad.numel()
        parts = 2 if shape == (300, 500) else 1
        assert _delta._parts(n, d, grad.device) == parts
        flat_ids, flat = group_ids(start, n, d=d, seed=seed), grad.reshape(-1)
        halves = [
            torch.zeros(d).index_add_(0, i, g)
            for i, g in zip(flat_ids.chunk(parts), flat.chunk(parts), strict=True)
        ]
        assert torch.equal(eager, sum(halves[1:], halves[0]))
        if parts == 2:  # the split matters: one pass over all entries gives other last bits here
            assert not torch.equal(eager, torch.zeros(d).index_add_(0, flat_ids, flat))


def test_segment_sum_bits_do_not_depend_on_the_thread_count():
    """The split into halves follows the sizes, not the threads: 1, 2 or 3 threads, same bits."""
    d, start, seed = 1000, 77, 5
    grad = torch.randn(400, 500)
    ids = group_ids(start, grad.numel(), d=d, seed=seed)
    assert _delta._parts(grad.numel(), d, grad.device) == 2
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            eager = _delta._eager_segment_sum(grad, start, d, seed, 0.0, 0, 1 << 14, torch.float32)
            results += [eager, _delta._sum_whole(ids, grad.reshape(-1), d, d)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


@compiled
@pytest.mark.parametrize("packed", [True, False])
def test_compiled_model_trains_like_eager(monkeypatch, packed):
    """Also covers the id hand-over from backward's recompute to the segment sum (with dropout),
    for a pack of the two targets and for each target on its own."""
    if not packed:
        monkeypatch.setattr(gpart.targets, "PACK_TARGET", 0)
    taken = []
    real_take = _delta.IdsHandoff.take
    monkeypatch.setattr(
        _delta.IdsHandoff, "take", lambda self, *a: taken.append(real_take(self, *a)) or taken[-1]
    )
    x = torch.randn(16, 8)
    results = []
    for backend in ("eager", "compiled"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
        gpart.apply(model, d=20, seed=3, backend=backend, dropout=0.1)
        assert model.gpart.backend == backend
        opt = torch.optim.SGD([gpart.theta(model)], lr=0.1)
        for _ in range(3):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert model.gpart.recipes.handoff.ids == {}  # every handed-over id tensor was used
        results.append(gpart.theta(model).detach().clone())
    assert torch.equal(results[0], results[1])
    handed = [t is not None for t in taken]
    # Both kernels hand ids over for layer 2, whose weight is saved (for the input gradient) and
    # recomputed; layer 0's input needs no gradient, so its weight is never saved. Packed, the
    # recompute of layer 2's weight is the pack's, so the pack's one segment sum gets its ids.
    assert handed == ([True] * 6 if packed else [True, False] * 6)
    assert bool(model.gpart.packs) == packed


def test_auto_backend_picks_eager_for_small_models(monkeypatch, tmp_path):
    def auto():
        return gpart.apply(nn.Sequential(nn.Linear(8, 8)), d=4, seed=0).gpart.backend  # D = 64

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache
    assert auto() == "eager"
    monkeypatch.setattr(_delta, "compiled_available", lambda device="cpu": True)
    monkeypatch.setattr(gpart.core, "AUTO_COMPILE_SIZE_WARM", 64)
    assert auto() == "eager"  # big enough for a warm cache only
    _delta._warm_marker("cpu").touch()
    assert _delta.compile_cache_warm() and auto() == "compiled"
    monkeypatch.setattr(gpart.core, "AUTO_COMPILE_SIZE", 64)
    _delta._warm_marker("cpu").unlink()
    assert auto() == "compiled"  # big enough for a cold cache
    monkeypatch.setattr(_delta, "compiled_available", lambda device="cpu": False)
    assert auto() == "eager"


@compiled
def test_a_working_compiler_marks_the_cache_warm(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_delta, "_available", {})
    assert not _delta.compile_cache_warm()
    assert _delta.compiled_available()
    assert _delta.compile_cache_warm()


@pytest.mark.parametrize(
    ("option", "value"), [("backend", "triton"), ("backend", None), ("recompute", "yes")]
)
def test_runtime_options_are_checked(option, value):
    with pytest.raises(gpart.ConfigError, match=option):
        gpart.apply(nn.Sequential(nn.Linear(8, 8)), d=4, seed=0, **{option: value})


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_compiled_kernel_builds_where_a_compiler_exists():
    # compiled_available() turns any failure into "use eager": make sure that is not hiding a bug.
    assert _delta.compiled_available()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("size", "d", "seed", "chunk"),
    [
        (10_000, 97, 5, 4096),
        (5003, 5003, -(2**70), 1000),
        (1, 1, 0, 7),
        (9000, 512, 2, 4096),  # a power of two: the mask
        (3000, 2**21 + 9, 4, 1024),  # above 2**21: the float64 quotient of all 64 bits
        (300_000, 1000, 3, 1 << 17),  # large chunks counted in two halves, the short last one in one
        (200_001, 4096, 1, 100_001),  # an odd chunk (one part), then an even one (two)
    ],
)
def test_compiled_group_counting_matches_eager(size, d, seed, chunk, device):
    from gpart.partition import group_counts

    _need_compiled(device)
    expected = group_counts(size, d=d, seed=seed)
    got = _delta.count_groups(size, d=d, seed=seed, backend="compiled", device=device, chunk=chunk)
    assert torch.equal(got.cpu(), expected)


@compiled
def test_counting_compiles_once_for_every_size():
    """Full chunks first, then a short last chunk, other sizes: one graph, no recompilation."""
    import torch._dynamo

    _delta.count_groups(4096, d=999, seed=0, backend="compiled", device="cpu", chunk=2048)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in (5000, 7001, 100, 4096):
            _delta.count_groups(size, d=999, seed=1, backend="compiled", device="cpu", chunk=2048)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_every_device_computes_the_cpu_bits(device, backend):
    """A checkpoint trained on one device gives the same merged weights on another."""
    if backend == "compiled":
        _need_compiled(device)
    torch.manual_seed(0)
    w0, theta, scale = torch.randn(300, 70), torch.randn(997), torch.rand(997)
    expected = _delta.effective(w0, theta, scale, start=12345, seed=-7, backend="eager")
    got = _delta.effective(
        w0.to(device), theta.to(device), scale.to(device), start=12345, seed=-7, backend=backend
    )
    assert torch.equal(got.cpu(), expected)
