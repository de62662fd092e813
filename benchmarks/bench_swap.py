"""Hot swap: time to switch a served model to another adapter file, against re-registering.

    python benchmarks/bench_swap.py                    # RoBERTa-base q,v (D = 14.2M), d = 131,072
    python benchmarks/bench_swap.py --config tiny --d 64 --repeats 3 --no-compiled

The model carries an adapter; each row loads another adapter file into it (``gpart.load``, the
file read, verified and copied) and reports the median over ``--repeats``:

* ``theta copy``: ``theta.copy_`` alone, the floor of any swap;
* ``swap``: a file with the adapter's layout: theta copied in place, O(d);
* ``swap, another seed`` / ``swap, another d``: the same targets, another partition: the group
  sizes are recounted (one pass over D), the hash offsets and scales rewritten in place;
* ``remove + load``: what a swap costs without hot swapping: unregister, register the new
  adapter (group counting included).

With ``--compiled`` (default), the model runs under ``torch.compile`` and each row adds the
first forward after the swap: a hot swap reuses the compiled graph, ``remove + load`` registers
new parametrizations and recompiles. Writes ``benchmarks/results/swap.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import build, machine, median, timed, write_json

import gpart


def _files(config: str, targets, d: int, root: Path) -> dict[str, Path]:
    """Adapter files for the config's base model: the served layout, another seed, another d."""
    out = {}
    for label, (dd, seed) in {
        "swap": (d, 0),
        "swap, another seed": (d, 1),
        "swap, another d": (d // 2, 0),
    }.items():
        model = build(config)[0]
        gpart.apply(model, d=dd, seed=seed, targets=targets, backend="eager", init_bound=1e-3)
        out[label] = gpart.save(model, root / f"{len(out)}.safetensors", trainable=False)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="roberta", help="a configuration of _common.build")
    p.add_argument("--d", type=int, default=131_072)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, batch, targets, _ = build(args.config)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    gpart.apply(model, d=args.d, seed=0, targets=targets, backend="eager")
    model.eval()
    size = model.gpart.layout.size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = _files(args.config, targets, args.d, Path(tmp))
        home = files["swap"]
        value = torch.randn(args.d)

        def copy():
            with torch.no_grad():
                gpart.theta(model).copy_(value)

        def swap(path):  # each swap returns to the served layout, so every repeat does the same work
            gpart.load(model, path)
            if path != home:
                gpart.load(model, home)

        def reload(path):
            gpart.remove(model)
            gpart.load(model, path, backend="eager")

        cases = {"theta copy": copy, **{k: (lambda p=v: swap(p)) for k, v in files.items()}}
        cases["remove + load"] = lambda: reload(home)
        for label, fn in cases.items():
            seconds = median(timed(fn, warmup=1, repeats=args.repeats))
            if label.startswith("swap, "):  # a round trip: report one swap, not two
                seconds /= 2
            rows.append({"case": label, "seconds": seconds})
            print(f"{label:<22} {seconds * 1e3:10.2f} ms", flush=True)

        if args.compiled:
            compiled = torch.compile(model)
            with torch.no_grad():
                compiled(**batch)  # compile once
                for label, fn in (("swap", lambda: swap(home)), ("remove + load", lambda: reload(home))):
                    times = []
                    for _ in range(max(2, args.repeats // 2)):
                        start = time.perf_counter()
                        fn()
                        compiled(**batch)
                        times.append(time.perf_counter() - start)
                    rows.append({"case": f"{label} + first compiled forward", "seconds": median(times)})
                    print(f"{rows[-1]['case']:<40} {median(times):8.2f} s", flush=True)
    payload = {"machine": machine(), "config": args.config, "d": args.d, "D": size, "rows": rows}
    print(f"wrote {write_json('swap', payload)}")
    return payload


if __name__ == "__main__":
    main()
