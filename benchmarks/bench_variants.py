"""Training-step time of the projection and assignment variants against the default partition.

    python benchmarks/bench_variants.py          # two stacks of q,v layers, side by side

Each variant trains the same stack (``layers`` blocks of three ``width x width`` linears, q and v
targeted) with AdamW; the table gives the median step time (interleaved rounds, medians over
repeats) and the ratio to the default (global scope, hashed ids). Writes
``benchmarks/results/variants.json``.
"""

from __future__ import annotations

import argparse

import torch
from _common import machine, median, timed, write_json
from torch import nn

import gpart

VARIANTS = {
    "partition": {},
    "block scope": {"scope": "block"},
    "generator": {"assignment": "generator"},
    "signed_magnitude": {"assignment": "signed_magnitude"},
    "fastfood": {"projection": "fastfood"},
}


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query, self.value, self.other = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        return torch.tanh(self.query(x) + self.value(x) + self.other(x))


class _Stack(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(_Block(width) for _ in range(layers)))  # blocks layers.0, ...

    def forward(self, x):
        return self.layers(x)


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return _Stack(width, layers)


def _step_fn(variant: str, width: int, layers: int, d: int, batch: int):
    model = gpart.apply(
        _model(width, layers), d=d, seed=0, targets=["query", "value"], backend="eager", **VARIANTS[variant]
    )
    x = torch.randn(batch, width)
    opt = torch.optim.AdamW([gpart.theta(model)], lr=1e-3)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["256x4:4096", "768x2:23040"], help="WIDTHxLAYERS:d")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    rows = []
    for config in args.configs:
        shape, d = config.split(":")
        width, layers = map(int, shape.split("x"))
        steps = {v: _step_fn(v, width, layers, int(d), args.batch) for v in VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):  # interleaved: every variant sees the same machine state
            for v, step in steps.items():
                times[v].append(median(timed(step, warmup=2, repeats=args.repeats)))
        base = median(times["partition"])
        for v in VARIANTS:
            t = median(times[v])
            rows.append(
                {
                    "config": config,
                    "D": 2 * layers * width * width,
                    "d": int(d),
                    "variant": v,
                    "step_s": t,
                    "x_partition": t / base,
                }
            )
    print(f"{'config':>14} {'variant':>18} {'step (ms)':>10} {'x partition':>12}")
    for r in rows:
        print(f"{r['config']:>14} {r['variant']:>18} {1e3 * r['step_s']:>10.2f} {r['x_partition']:>12.2f}")
    write_json("variants", {"machine": machine(), "rows": rows})
    return {"rows": rows}


if __name__ == "__main__":
    main()
