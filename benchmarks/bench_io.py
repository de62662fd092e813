"""Save/load time and file size of adapters as d grows.

    python benchmarks/bench_io.py                  # d = 1e3 .. 1e7

For each d: ``gpart.save`` (theta only), ``gpart.load`` into an adapted model (verify + copy) and
into a plain model (apply with the file's settings, then load), and the file size against
``4 d`` bytes. Writes ``benchmarks/results/io.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import machine, median, timed, write_json
from torch import nn

import gpart


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(2048, 2048, bias=False) for _ in range(4)))  # D = 16.8M


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6, 1e7])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in map(int, args.ds):
            model = gpart.apply(base(), d=d, seed=0, backend="eager")
            path = Path(tmp) / f"a{d}.safetensors"
            save = median(
                timed(
                    lambda m=model, p=path: gpart.save(m, p, trainable=False), warmup=1, repeats=args.repeats
                )
            )
            adapted = gpart.apply(base(), d=d, seed=0, backend="eager")
            load = median(timed(lambda a=adapted, p=path: gpart.load(a, p), warmup=1, repeats=args.repeats))
            plains = [base() for _ in range(args.repeats + 1)]
            it = iter(plains)
            load_plain = median(
                timed(
                    lambda p=path, it=it: gpart.load(next(it), p, backend="eager"),
                    warmup=1,
                    repeats=args.repeats,
                )
            )
            size = path.stat().st_size
            rows.append(
                {
                    "d": d,
                    "save_s": save,
                    "load_s": load,
                    "load_plain_s": load_plain,
                    "bytes": size,
                    "theta_bytes": 4 * d,
                }
            )
            print(
                f"d={d:>10,}  save {1e3 * save:8.2f} ms  load {1e3 * load:8.2f} ms  load into plain "
                f"{1e3 * load_plain:8.1f} ms  file {size:>11,} B = 4d + {size - 4 * d:,}",
                flush=True,
            )
    print(f"wrote {write_json('io', {'machine': machine(), 'rows': rows})}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
