"""Set-up cost of ``gpart.apply`` as D grows, and the persistent bytes gpart adds.

    python benchmarks/bench_apply.py                       # D from 1e6 to 1e9
    python benchmarks/bench_apply.py --sizes 1e6 1e7 --backends eager compiled

Targets are square Linear layers on the ``meta`` device (shapes only, no weights), so D up to 1e9
fits on any machine: what is measured is gpart's own work (target resolution, group counting,
registering parametrizations) and memory. d = D / 1000 (capped at 2**20). Reports the wall time,
the transient peak of tensor memory during ``apply`` (profiler timeline) and the persistent bytes
added (theta and the group scales), against the bound ``8 d`` plus a constant per target. The
variants (``--variants``, eager, up to ``--variant-max`` entries) add their own state: stored ids
(generator: 2 or 4 bytes an entry) or the Fastfood state (9 bytes a position); block scope adds
nothing. Writes ``benchmarks/results/apply.json``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, tensor_bytes, transient_peak_bytes, write_json
from torch import nn

import gpart

VARIANTS = {
    "partition": {},
    "block scope": {"scope": "block"},
    "generator": {"assignment": "generator"},
    "fastfood": {"projection": "fastfood"},
}


def model_with(size: int, width: int = 4096) -> nn.Module:
    """Meta-device square Linear layers (``layers.0``, ``layers.1``, ...) holding about ``size`` weights."""
    width = min(width, int(size**0.5))
    layers = max(1, round(size / width**2))
    with torch.device("meta"):
        model = nn.Module()
        model.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))
        return model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8, 1e9])
    p.add_argument("--backends", nargs="+", default=["eager", "compiled"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--variant-max", type=float, default=1e8, help="largest D for the variants")
    args = p.parse_args(argv)
    rows = []
    runs = [(s, b, "partition") for s in map(int, args.sizes) for b in args.backends]
    runs += [
        (s, "eager", v)
        for v in args.variants
        if v != "partition"
        for s in map(int, args.sizes)
        if s <= args.variant_max
    ]
    for size, backend, variant in runs:
        options = VARIANTS[variant]
        model = model_with(size)
        targets = len(model.layers)
        D = sum(m.weight.numel() for m in model.layers)
        d = min(max(1, D // 1000), 1 << 20)
        before = {id(t) for t in [*model.parameters(), *model.buffers()]}
        if backend == "compiled":  # build the kernel once, outside the measurement
            gpart.apply(model_with(10**5), d=10, seed=0, backend=backend)
        start = time.perf_counter()
        gpart.apply(model, d=d, seed=0, backend=backend, **options)
        seconds = time.perf_counter() - start
        added = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in before]
        persistent = tensor_bytes(added)
        gpart.remove(model)
        transient = transient_peak_bytes(
            lambda m=model, dd=d, b=backend, o=options: gpart.apply(m, d=dd, seed=0, backend=b, **o),
            "cpu",
        )
        rows.append(
            {
                "D": D,
                "d": d,
                "targets": targets,
                "backend": backend,
                "variant": variant,
                "seconds": seconds,
                "transient_bytes": transient,
                "persistent_bytes": persistent,
                "bound": 8 * d + 8 * targets,
            }
        )
        print(
            f"D={D:>13,} d={d:>9,} targets={targets:>3} {backend:<9} {variant:<12} apply {seconds:8.3f} s  "
            f"transient {transient / 2**20:8.1f} MiB  persistent {persistent:>10,} B "
            f"(8d + 8 per target = {8 * d + 8 * targets:,})",
            flush=True,
        )
    print(f"wrote {write_json('apply', {'machine': machine(), 'rows': rows})}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
