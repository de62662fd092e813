"""Smoke tests: every benchmark script runs end to end on tiny sizes and writes its JSON.

Timings are never asserted here (they belong to the benchmarks themselves); results go to a temp
folder so the published ones in benchmarks/results are never touched.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytest.importorskip("matplotlib")


@pytest.fixture
def bench(tmp_path, monkeypatch):
    monkeypatch.setenv("GPART_BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("GPART_BENCH_DOCS", str(tmp_path / "docs"))
    monkeypatch.syspath_prepend(str(BENCH))
    for name in [m for m in sys.modules if m in ("_common", "plot") or m.startswith("bench_")]:
        del sys.modules[name]

    def run(name: str, *argv: str):
        module = importlib.import_module(name)
        return module.main() if name == "plot" else module.main(list(argv))

    return run


def test_all_scripts_run_and_plot(bench, tmp_path):
    step = bench(
        "bench_step",
        "--configs",
        "tiny",
        "--methods",
        "full",
        "reference",
        "gpart",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--warmup",
        "1",
    )
    tiny = step["configs"]["tiny"]
    assert set(tiny) == {"full", "reference", "gpart"}
    assert tiny["full"]["x_full"] == 1.0 and tiny["gpart"]["persistent_mb"] > 0
    # The other methods in this process: a worker process per method costs seconds of imports each.
    worker = sys.modules["bench_step"].worker
    for method in ("floor", "lora"):
        assert len(worker("tiny", method, "float32", "cpu", 0, 1)["times"]) == 1
    part = bench("bench_partition", "--targets", "2", "--shape", "64", "64", "--d", "100", "--repeats", "1")
    assert part["counting"]
    bench("bench_apply", "--sizes", "1e4", "--backends", "eager")
    io = bench("bench_io", "--ds", "100", "--repeats", "1")
    assert io["rows"][0]["bytes"] > 400
    inf = bench("bench_inference", "--config", "tiny", "--batch", "1", "8", "--rounds", "1", "--repeats", "2")
    assert inf["merged_matches"]
    bf16 = bench("bench_bf16", "--steps", "3", "--d", "64")
    assert set(bf16["curves"]) == {"gpart", "reference"} and bf16["survival"][-1]["changed_fraction"] > 0.9
    tiny_grid = ("--widths", "16", "--targets", "2", "--rounds", "1", "--steps", "1", "--profile", "16", "2")
    eager = ("--methods", "full", "bare", "gpart", "gpart-drop")  # the compiled ones compile: slow
    over = bench("bench_overhead", *tiny_grid, *eager)
    assert {"full", "bare", "gpart", "gpart-drop"} <= set(over["rows"][0]) and over["profiles"]
    auto = bench("bench_auto", "--sizes", "1e4", "--measure", "1", "--steps", "3", "--variants", "eager")
    assert [r["variant"] for r in auto["rows"]] == ["eager"]
    conv = bench("bench_convert", "--layers", "1", "--d", "64", "--repeats", "1")
    assert conv["D"] == 2 * 4096 * 4096 and conv["convert_s"] < conv["command_s"]
    var = bench("bench_variants", "--configs", "16x2:8", "--rounds", "1", "--repeats", "1")
    assert {r["variant"] for r in var["rows"]} >= {"partition", "fastfood", "block scope"}
    swap = bench("bench_swap", "--config", "tiny", "--d", "64", "--repeats", "1", "--no-compiled")
    assert [r["case"] for r in swap["rows"]][-1] == "remove + load"
    bench("plot")
    results = {p.stem for p in (tmp_path / "results").glob("*.json")}
    assert results == {
        "step",
        "partition",
        "apply",
        "io",
        "inference",
        "bf16",
        "overhead",
        "auto",
        "convert",
        "variants",
        "swap",
    }
    apply_row = json.loads((tmp_path / "results" / "apply.json").read_text())["rows"][0]
    # theta and the scales (4 + 4 bytes per group), one 8-byte hash offset per target: nothing D-sized
    assert apply_row["persistent_bytes"] == 8 * apply_row["d"] + 8 * apply_row["targets"]
    by_variant = {
        r["variant"]: r for r in json.loads((tmp_path / "results" / "apply.json").read_text())["rows"]
    }
    assert by_variant["block scope"]["persistent_bytes"] == apply_row["persistent_bytes"]
    assert by_variant["generator"]["persistent_bytes"] == apply_row["persistent_bytes"] + 2 * apply_row["D"]
    assert by_variant["fastfood"]["persistent_bytes"] >= apply_row["persistent_bytes"] + 9 * apply_row["D"]
    text = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "## Training step" in text and (tmp_path / "docs" / "bench_step.png").stat().st_size > 1000


def test_gpu_script_is_valid_bash_and_runs_the_published_gpu_commands(bench):
    import subprocess

    from plot import SECTIONS  # the bench fixture puts benchmarks/ on sys.path

    script = BENCH / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = " ".join(script.read_text().replace("\\\n", " ").split())
    for name, _, command, *_ in SECTIONS:
        if name.endswith("_cuda"):  # the published GPU results come from this script's commands
            assert command.removeprefix("python ") in text, command


def test_native_kernels_match_gpart_bit_for_bit(bench, tmp_path):
    """The C evidence kernels: the script itself compares every C result with gpart's and raises."""
    res = bench("bench_native", "--configs", "tiny", "tiny-pow2", "--repeats", "1")
    if "skipped" in res:
        pytest.skip(res["skipped"])
    assert set(res["configs"]) == {"tiny", "tiny-pow2"}
    for r in res["configs"].values():
        assert set(r["ns_per_entry"]["forward W0 + delta"]) == {"torch", "C"}
    bench("plot")
    assert "hand-written AVX-512 C" in (tmp_path / "docs" / "benchmarks.md").read_text()


def test_the_reference_baseline_hashes_like_gpart(bench):
    """The reference-style baseline keeps its own plain hash; it must still be the partition."""
    import torch
    from _common import _plain_group_ids  # the bench fixture puts benchmarks/ on sys.path

    from gpart.partition import group_ids

    for d, seed in [(23040, 0), (131072, -5), (7, 2**70), (1, 3)]:
        expected = group_ids(12345, 5000, d=d, seed=seed)
        assert torch.equal(_plain_group_ids(12345, 5000, d, seed, None), expected)
