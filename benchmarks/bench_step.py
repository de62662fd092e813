"""Per-step time and peak memory of GPart vs the baselines, each method in its own process.

    python benchmarks/bench_step.py                         # the three CPU configs, fp32
    python benchmarks/bench_step.py --configs roberta --rounds 3 --steps 5
    python benchmarks/bench_step.py --configs qwen2-0.5b --dtype bfloat16 --device cuda   # on a GPU

Methods run in separate processes, interleaved round by round (so drift hits all alike); each
process does warm-up steps, then ``--steps`` timed steps (forward, backward, optimizer). Reported:
median step time over all timed steps of all rounds; ratios to full fine-tuning and to the
reference-style GPart: of the medians, per round (runs minutes apart; median and spread over
rounds) and of the best steps (the estimate least disturbed by other tenants); memory above the
frozen model: the persistent bytes the method adds (adapter tensors, optimizer state; counted
exactly) plus the transient peak of live tensor memory during one step (the profiler's memory
timeline). Writes ``benchmarks/results/step.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from _common import (
    METHODS,
    added_bytes,
    build,
    machine,
    median,
    setup,
    storages,
    timed,
    transient_peak_bytes,
    write_json,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def worker(config: str, method: str, dtype: str, device: str, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    with torch.device(device):  # build on the device: a 0.5B model's CPU init takes a while
        model, batch, targets, d = build(config, DTYPES[dtype])
        frozen = storages(model)
        params = setup(method, model, targets, d)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step():
        loss = model(**batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    times = timed(step, warmup=warmup, repeats=steps)
    persistent = added_bytes(model, frozen, opt)
    transient = transient_peak_bytes(step, device)
    extra = {"backend": model.gpart.backend} if hasattr(model, "gpart") else {}
    return {"times": times, "persistent": persistent, "transient": transient, **extra}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["llama", "roberta", "minilm"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=3, help="processes per method, interleaved")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--out", default="step")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = worker(*args.worker, args.dtype, args.device, args.warmup, args.steps)
        print("RESULT " + json.dumps(result))
        return result

    results: dict = {"machine": machine(), "args": vars(args), "configs": {}}
    for config in args.configs:
        runs: dict[str, list[dict]] = {m: [] for m in args.methods}
        for r in range(args.rounds):
            order = args.methods[r % len(args.methods) :] + args.methods[: r % len(args.methods)]
            for method in order:
                cmd = [sys.executable, __file__, "--worker", config, method, "--dtype", args.dtype]
                cmd += ["--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode != 0 or not line:
                    raise RuntimeError(f"{config}/{method} failed:\n{out.stderr[-3000:]}")
                runs[method].append(json.loads(line[0][7:]))
                print(
                    f"  {config} round {r + 1} {method}: {median(runs[method][-1]['times']):.3f} s",
                    flush=True,
                )
        summary = {}
        for method, rs in runs.items():
            times = [t for run in rs for t in run["times"]]
            summary[method] = {
                "median_s": median(times),
                "persistent_mb": rs[0]["persistent"] / 2**20,
                "transient_mb": median([run["transient"] for run in rs]) / 2**20,
                "backend": rs[0].get("backend"),
                "times": times,
            }
        for method, s in summary.items():
            for base in ("full", "reference", "floor"):
                if base in summary:
                    s[f"x_{base}"] = s["median_s"] / summary[base]["median_s"]
                    # Runs of the same round are minutes apart, not tens of minutes: the per-round
                    # ratio cancels most of this machine's drift. Median and spread over rounds.
                    paired = sorted(
                        median(a["times"]) / median(b["times"])
                        for a, b in zip(runs[method], runs[base], strict=True)
                    )
                    s[f"x_{base}_paired"] = {"median": median(paired), "min": paired[0], "max": paired[-1]}
                    # Interference from other tenants only ever adds time: the best step of each
                    # method is the least disturbed estimate of its cost.
                    s[f"x_{base}_best"] = min(s["times"]) / min(summary[base]["times"])
            s["peak_above_frozen_mb"] = s["persistent_mb"] + s["transient_mb"]
        for s in summary.values():
            if "reference" in summary:
                s["mem_x_reference"] = (
                    s["peak_above_frozen_mb"] / summary["reference"]["peak_above_frozen_mb"]
                )
        results["configs"][config] = summary
        print(f"\n{config} ({args.dtype}, {args.device}): median step time over {len(times)} steps")
        print(
            f"{'method':<20}{'step (s)':>9}{'x full':>8}{'x ref':>8}{'x floor':>8}"
            f"{'kept MB':>9}{'peak MB':>9}{'mem x ref':>10}{'best x full':>12}   per-round x full [min, max]"
        )
        for method, s in summary.items():
            mem_ref = s.get("mem_x_reference")
            label = method + (f" ({s['backend']})" if s["backend"] else "")
            print(
                f"{label:<20}{s['median_s']:>9.3f}{s.get('x_full', float('nan')):>8.3f}"
                f"{s.get('x_reference', float('nan')):>8.3f}{s.get('x_floor', float('nan')):>8.3f}"
                f"{s['persistent_mb']:>9.1f}{s['peak_above_frozen_mb']:>9.1f}"
                f"{mem_ref if mem_ref is not None else float('nan'):>10.3f}"
                + (f"{s['x_full_best']:>12.3f}   {_spread(s['x_full_paired'])}" if "x_full_best" in s else "")
            )
        print()
    path = write_json(args.out, results)
    print(f"wrote {path}")
    return results


def _spread(r: dict) -> str:
    return f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"


if __name__ == "__main__":
    main()
