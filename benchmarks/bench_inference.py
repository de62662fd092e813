"""Forward latency (inference, no grad): base model vs gpart (recomputing deltas, cached) vs merged.

    python benchmarks/bench_inference.py                   # RoBERTa-base shape, batch 1 x 128

Methods, each on the same model and input, interleaved over rounds:

* ``base``: the frozen model without gpart;
* ``gpart``: every forward rebuilds ``W0 + delta`` (what training does);
* ``gpart cached``: inside ``gpart.cached(model)``, the deltas are built once for all forwards;
* ``merged``: after ``gpart.merge``: a plain model again;
* ``base (deep copy)``: a deep copy of the base model, the control for what copying alone does.

Ratios are to ``base``; ``merged`` should match the control, and both 1.0 within noise.
Writes ``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import build, machine, median, timed, write_json

import gpart


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="roberta")
    p.add_argument("--batch", type=int, nargs=2, default=[1, 128])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    base, batch, targets, d = build(args.config)
    batch = {"input_ids": batch["input_ids"][: args.batch[0], : args.batch[1]]}
    base.eval()
    adapted = gpart.apply(copy.deepcopy(base), d=d, seed=0, targets=targets)
    with torch.no_grad():
        gpart.theta(adapted).normal_(0, 0.1)
    merged = gpart.merge(copy.deepcopy(adapted))
    control = copy.deepcopy(base)  # same structure as merged, no gpart history: the noise floor

    def run(model):
        with torch.no_grad():
            model(**batch)

    def run_cached():
        with torch.no_grad(), gpart.cached(adapted):
            for _ in range(args.repeats):
                adapted(**batch)

    methods = {
        "base": lambda: timed(lambda: run(base), warmup=1, repeats=args.repeats),
        "gpart": lambda: timed(lambda: run(adapted), warmup=1, repeats=args.repeats),
        "gpart cached": lambda: [t / args.repeats for t in timed(run_cached, warmup=1, repeats=1)],
        "merged": lambda: timed(lambda: run(merged), warmup=1, repeats=args.repeats),
        "base (deep copy)": lambda: timed(lambda: run(control), warmup=1, repeats=args.repeats),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.rounds):  # rotate the order so that no method always runs first or last
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name] += methods[name]()
    with torch.no_grad():
        same = torch.allclose(merged(**batch).logits, adapted(**batch).logits, rtol=1e-4, atol=1e-5)
    summary = {
        k: {"median_s": median(v), "x_base": median(v) / median(times["base"])} for k, v in times.items()
    }
    print(f"{args.config}, batch {args.batch[0]} x {args.batch[1]}, backend {adapted.gpart.backend}")
    print(f"{'method':<18}{'ms':>9}{'x base':>9}")
    for k, s in summary.items():
        print(f"{k:<18}{1e3 * s['median_s']:>9.2f}{s['x_base']:>9.3f}")
    print(f"merged outputs equal the adapted model's: {same}")
    result = {"machine": machine(), "args": vars(args), "summary": summary, "merged_matches": same}
    print(f"wrote {write_json('inference', result)}")
    return result


if __name__ == "__main__":
    main()
