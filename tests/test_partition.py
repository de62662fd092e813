"""The partition: golden ids, the pure-Python oracle, chunking invariance, counts and scales."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import DATA, DEVICES, golden, ref_group_id
from hypothesis import given, settings
from hypothesis import strategies as st

from gpart.partition import ALGORITHM, group_counts, group_ids, group_scales


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", golden()["group_ids"], ids=lambda c: f"d{c['d']}-seed{c['seed']}")
def test_golden_group_ids_exact(case, device):
    got = group_ids(case["start"], case["count"], d=case["d"], seed=case["seed"], device=device)
    assert got.dtype == torch.int64
    assert got.tolist() == case["ids"]


def test_vendored_golden_matches_shared_copy():
    shared = Path(__file__).resolve().parents[2] / "shared" / "test-vectors"
    if not shared.is_dir():
        pytest.skip("../shared/test-vectors not present beside this checkout")
    for name in ("official_partition.json", "official_peft_checkpoint/expected_deltas.json"):
        assert json.loads((DATA / name).read_text()) == json.loads((shared / name).read_text())


def test_algorithm_id_is_pinned():
    # Changing the rule breaks every saved adapter: bump ALGORITHM and keep the old one loadable.
    assert ALGORITHM == "splitmix64-v1"


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 2**62),
    count=st.integers(0, 40),
    d=st.integers(1, 2**62),
    seed=st.integers(-(2**80), 2**80),
)
def test_matches_python_oracle(start, count, d, seed):
    got = group_ids(start, count, d=d, seed=seed).tolist()
    assert got == [ref_group_id(seed, start + k, d) for k in range(count)]


@settings(max_examples=50, deadline=None)
@given(
    start=st.integers(0, 2**40),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
    d=st.integers(1, 5000),
    seed=st.integers(-(2**64), 2**64),
)
def test_chunking_invariance(start, cuts, d, seed):
    total = 3000
    whole = group_ids(start, total, d=d, seed=seed)
    edges = sorted({0, total, *cuts})
    parts = [group_ids(start + a, b - a, d=d, seed=seed) for a, b in itertools.pairwise(edges)]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_group_counts_match_bincount_for_any_chunk(chunk):
    size, d, seed = 5003 if chunk > 1 else 300, 97, 12345
    expected = torch.bincount(group_ids(0, size, d=d, seed=seed), minlength=d)
    counts = group_counts(size, d=d, seed=seed, chunk_size=chunk)
    assert torch.equal(counts, expected)
    assert int(counts.sum()) == size


def test_scales():
    counts = torch.tensor([4, 1, 0, 9])
    assert group_scales(counts, isometric=True).tolist() == [0.5, 1.0, 1.0, pytest.approx(1 / 3)]
    assert group_scales(counts, isometric=False).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert group_scales(counts).dtype == torch.float32


def test_group_sizes_are_balanced():
    counts = group_counts(1_000_000, d=1000, seed=7)
    # A uniform hash gives Binomial(1e6, 1e-3): mean 1000, sd ~31.6.
    assert counts.min() > 800 and counts.max() < 1200


@pytest.mark.parametrize("bad", [{"d": 0}, {"d": -3}, {"start": -1}, {"count": -1}])
def test_invalid_arguments(bad):
    kwargs = {"start": 0, "count": 4, "d": 10, "seed": 0, **bad}
    with pytest.raises(ValueError):
        group_ids(kwargs.pop("start"), kwargs.pop("count"), **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_scales_are_the_same_bits_on_every_device(device):
    counts = torch.arange(0, 2_000_000)
    expected = group_scales(counts)
    assert torch.equal(group_scales(counts.to(device)).cpu(), expected)
    assert torch.equal(expected[1:5], torch.tensor([1.0, 2**-0.5, 3**-0.5, 0.5]))


@pytest.mark.parametrize("before_wrap", [0, 1, 5, 9, 10, 11])
def test_ids_across_the_signed_wrap_of_the_hash_input(before_wrap):
    """seed + i + golden crosses 2**63 (int64 wraps) inside the range, at its end, or just after."""
    seed = (1 << 63) - before_wrap - 0x9E3779B97F4A7C15
    got = group_ids(0, 10, d=97, seed=seed).tolist()
    assert got == [ref_group_id(seed, i, 97) for i in range(10)]


def test_scales_are_the_reference_float32_ops_correctly_rounded():
    """``1/sqrt(n)`` as float32 ``sqrt`` then float32 ``1 /`` (the authors' ops), each correctly
    rounded: numpy's float32 sqrt and division are IEEE, an independent oracle."""
    import numpy as np

    n = 2_000_000
    ours = group_scales(torch.arange(1, n + 1)).numpy().view(np.uint32)
    sizes = np.arange(1, n + 1, dtype=np.float32)
    oracle = (np.float32(1) / np.sqrt(sizes)).view(np.uint32)
    assert np.array_equal(ours, oracle)
    once = (1.0 / np.sqrt(np.arange(1, n + 1, dtype=np.float64))).astype(np.float32).view(np.uint32)
    differ = np.nonzero(ours != once)[0] + 1
    assert len(differ) == 580_733 and differ[:5].tolist() == [6, 7, 17, 18, 21]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scales_are_the_same_bits_on_cuda():
    counts = torch.randint(0, 3_000_000, (100_000,))
    assert torch.equal(group_scales(counts.cuda()).cpu(), group_scales(counts))
