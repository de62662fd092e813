"""Throughput of the delta path and of set-up counting, per kernel, against a plain memory copy.

    python benchmarks/bench_partition.py          # 24 targets of 768 x 768 (RoBERTa-base q,v), d = 23,040
    python benchmarks/bench_partition.py --targets 28 --shape 4096 4096 --d 131072

For each shipped kernel (eager, compiled) it times, over all targets (D entries in total):

* forward: ``W = W0 + delta`` from theta (hash, modulo, gather, add, cast) vs copying W0 into W
  (the same bytes read and written);
* backward: the segment sum ``P^T grad`` vs copying the gradient (the same bytes read); for the
  compiled kernel also with the group ids handed over by backward's recompute;
* floors: the gather and the segment sum alone, with the group ids already in memory (no
  hashing): what no kernel made of torch's gather and scatter can beat on this machine;
* set-up: counting group sizes, against eager chunked counting with the same chunk size.

Prints a table and writes ``benchmarks/results/partition.json``.
"""

from __future__ import annotations

import argparse

import torch
from _common import machine, median, timed, write_json

from gpart import _delta
from gpart.partition import group_counts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=int, default=24, help="number of target tensors")
    p.add_argument("--shape", type=int, nargs=2, default=[768, 768], help="shape of each target")
    p.add_argument("--d", type=int, default=23_040)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="partition", help="name of the JSON file in benchmarks/results/")
    p.add_argument("--profile", action="store_true", help="print where one call of each kernel spends time")
    args = p.parse_args(argv)
    d, dev = args.d, args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def bench(fn, label: str = "") -> float:
        def run():
            fn()
            sync()

        t = median(timed(run, warmup=2, repeats=args.repeats))
        if args.profile and label:
            _profile(run, label, dev)
        return t

    torch.manual_seed(0)
    w0s = [torch.randn(*args.shape, device=dev) for _ in range(args.targets)]
    grads = [torch.randn_like(w) for w in w0s]
    outs = [torch.empty_like(w) for w in w0s]
    starts = [i * w0s[0].numel() for i in range(args.targets)]
    size = sum(w.numel() for w in w0s)
    theta, scale = torch.randn(d, device=dev), torch.rand(d, device=dev)
    rows: dict[str, dict] = {}
    copy = bench(lambda: [o.copy_(w) for o, w in zip(outs, w0s, strict=True)])
    rows["memory copy (W0 -> W)"] = {"seconds": copy, "x_copy": 1.0}
    for backend in _delta.BACKENDS:

        def forward(b=backend):
            with torch.no_grad():
                for w, s in zip(w0s, starts, strict=True):
                    _delta.effective(w, theta, scale, start=s, seed=0, backend=b)

        t = bench(forward, f"forward [{backend}]")
        rows[f"forward W0+delta [{backend}]"] = {"seconds": t, "x_copy": copy / t}
        seg = _delta._KERNELS[backend][1]
        t = bench(
            lambda s=seg: [
                s(g, st, d, 0, 0.0, 0, 1 << 20, torch.float32) for g, st in zip(grads, starts, strict=True)
            ]
        )
        rows[f"backward P^T grad [{backend}]"] = {"seconds": t, "x_copy": copy / t}
    handoff = _delta.IdsHandoff()

    def recompute_then_sum():
        for w, g, s in zip(w0s, grads, starts, strict=True):
            _delta.recompute(
                w,
                theta,
                scale,
                start=s,
                seed=0,
                dropout=0.0,
                dropout_key=0,
                backend="compiled",
                handoff=handoff,
            )
            _delta._segment_sum_of_ids(g, handoff.take(0, s, g.numel(), 0), d, 0.0, torch.float32)

    t = bench(recompute_then_sum, "recompute + segment sum [compiled]")
    rows["backward recompute + P^T grad, ids handed over [compiled]"] = {"seconds": t, "x_copy": 2 * copy / t}

    # Floors of any kernel built from torch's gather and scatter: the same work with the group ids
    # already in memory (what a cached-ids kernel would do, at 4 bytes per entry), no hashing.
    ids = [torch.randint(0, d, (w.numel(),), device=dev, dtype=torch.int32) for w in w0s]
    gather = torch.compile(lambda w, t, i: w + torch.ops.aten._unsafe_index(t, [i]), dynamic=True)
    t = bench(lambda: [gather(w.reshape(-1), theta, i) for w, i in zip(w0s, ids, strict=True)])
    rows["floor: W0 + theta[ids], ids in memory [compiled gather]"] = {"seconds": t, "x_copy": copy / t}
    ids64 = [i.long() for i in ids]
    t = bench(lambda: [_delta._sum_whole(i, g.reshape(-1), d, d) for i, g in zip(ids64, grads, strict=True)])
    rows["floor: P^T grad, ids in memory [scatter-add]"] = {"seconds": t, "x_copy": copy / t}

    counting = {}
    for chunk in (1 << 20, 1 << 22):
        eager = bench(lambda c=chunk: group_counts(size, d=d, seed=0, chunk_size=c, device=dev))
        comp = bench(
            lambda c=chunk: _delta.count_groups(size, d=d, seed=0, backend="compiled", device=dev, chunk=c)
        )
        counting[chunk] = {"eager_s": eager, "compiled_s": comp, "speedup": eager / comp}

    print(
        f"{args.targets} targets of {tuple(args.shape)}: D = {size:,}, d = {d:,}, {dev}, "
        f"median of {args.repeats}"
    )
    print(f"{'operation':<62}{'ms':>9}{'x copy':>9}")
    for name, r in rows.items():
        print(f"{name:<62}{1e3 * r['seconds']:>9.1f}{r['x_copy']:>9.2f}")
    print(f"\n{'set-up counting, chunk':<30}{'eager ms':>10}{'compiled ms':>13}{'speed-up':>10}")
    for chunk, r in counting.items():
        print(f"{chunk:<30,}{1e3 * r['eager_s']:>10.1f}{1e3 * r['compiled_s']:>13.1f}{r['speedup']:>10.2f}")
    result = {"machine": machine(), "size": size, "d": d, "device": dev, "rows": rows, "counting": counting}
    print(f"wrote {write_json(args.out, result)}")
    return result


def _profile(run, label: str, dev: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {label}\n{prof.key_averages().table(sort_by=key, row_limit=12)}")


if __name__ == "__main__":
    main()
