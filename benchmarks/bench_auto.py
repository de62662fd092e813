"""Which kernel a typical run should use: eager vs compiled, total time of set-up + 300 steps.

    python benchmarks/bench_auto.py                          # D = 1e5 .. 1e8, ~10 minutes
    python benchmarks/bench_auto.py --sizes 1e5 1e6 --steps 300

``backend="auto"`` has to choose before training starts. Compiling costs a one-off set-up
(tracing and code generation with a cold compile cache, loading from the cache with a warm one)
and saves time at every step; the eager kernel starts at once. For each D (a stack of square
linear layers, all targets, d = 131,072 or D/4 if smaller, batch 4) and each of ``eager``,
``compiled`` with a cold Inductor cache and ``compiled`` with a warm one, a fresh process times
``apply`` (group counting included), the first step (compilation happens there too) and
``--measure`` further steps; the total of a run is ``set-up + first + (steps - 1) x median``.
Each process also reports its peak resident memory (the whole process, not only torch's
tensors). Writes ``benchmarks/results/auto.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import machine, write_json

VARIANTS = ("eager", "compiled-cold", "compiled-warm")


def _shape(size: float) -> tuple[int, int]:
    """(width, layers) of a stack of square layers with about ``size`` weight entries."""
    width = 256 if size <= 1e6 else 1024 if size <= 1e7 else 4096
    return width, max(1, round(size / width**2))


def worker(size: float, backend: str, measure: int) -> dict:
    import torch
    from torch import nn

    import gpart

    width, layers = _shape(size)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    x = torch.randn(4, width)
    d = min(131072, width * width * layers // 4)
    start = time.perf_counter()
    gpart.apply(model, d=d, seed=0, backend=backend)
    setup = time.perf_counter() - start

    def step():
        model(x).square().mean().backward()
        gpart.theta(model).grad = None

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(measure):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "D": width * width * layers,
        "setup_s": setup,
        "first_step_s": first,
        "step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run(size: float, variant: str, measure: int, cache: str) -> dict:
    backend = "eager" if variant == "eager" else "compiled"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    cmd = [sys.executable, __file__, "--worker", str(size), backend, "--measure", str(measure)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"{size}/{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7, 1e8])
    p.add_argument("--steps", type=int, default=300, help="the length of the run being judged")
    p.add_argument("--measure", type=int, default=10, help="timed steps after the first")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="auto")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = worker(float(args.worker[0]), args.worker[1], args.measure)
        print("RESULT " + json.dumps(result))
        return result

    rows = []
    print(
        f"{'D':>10} {'variant':<14} {'set-up s':>9} {'1st step s':>10} {'step ms':>9} {'total s':>8} "
        f"{'RSS MB':>8}"
    )
    for size in args.sizes:
        cache = tempfile.mkdtemp(prefix="gpart-inductor-")
        try:
            for variant in [v for v in VARIANTS if v in args.variants]:  # cold fills the warm's cache
                r = _run(size, variant, args.measure, cache)
                r["variant"] = variant
                r["total_s"] = r["setup_s"] + r["first_step_s"] + (args.steps - 1) * r["step_s"]
                rows.append(r)
                print(
                    f"{r['D']:>10,} {variant:<14} {r['setup_s']:>9.2f} {r['first_step_s']:>10.2f} "
                    f"{r['step_s'] * 1e3:>9.2f} {r['total_s']:>8.1f} {r['peak_rss_mb']:>8.0f}",
                    flush=True,
                )
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    payload = {"machine": machine(), "steps": args.steps, "rows": rows}
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
