"""Is gpart's CPU floor this machine's or pure PyTorch's? Shipped kernels vs hand-written AVX-512 C.

    python benchmarks/bench_native.py

gpart's per-entry work in a training step is two hashed gathers (forward, and backward's
recompute) and one segment sum; full fine-tuning's is AdamW. The shipped CPU kernels are what
torch and Inductor generate, and Inductor emits a gather as a scalar loop. This script times the
same work with the kernels in ``benchmarks/native/floor.c`` (the hardware gather ``vgatherdps``),
compiled here with the system C compiler, and checks every C result against gpart's bit for bit.
The C code is evidence for ``docs/performance.md``, not part of the library (gpart is pure PyTorch).

Two configurations, one Llama-like (d = 2**17: the modulo is a mask) and one RoBERTa-like (q,v of
RoBERTa-base, d = 23,040: a true modulo, by gpart's own split algorithm). Rows, in ns per entry:

* copy: ``W.copy_(W0)``, the memory-copy yardstick of the issue's ``>= 0.5x copy`` item;
* forward ``W0 + delta``: gpart's compiled kernel (returns a fresh W, as it must) vs C (hash,
  modulo, hardware gather, add);
* gather with the ids in memory (no hash): Inductor vs C;
* segment sum ``P^T grad`` in two halves with the ids in memory: torch ``scatter_add`` vs C;
* AdamW over the same entries: torch's default for CPU tensors and ``fused=True``;
* step work: 2 x forward + segment sum (gpart) against AdamW (full fine-tuning).

Needs a C compiler (``$CC`` or ``cc``) and an AVX-512 CPU; says so and writes nothing otherwise.
Prints a table and writes ``benchmarks/results/native.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from _common import machine, median, timed, write_json

from gpart import _delta
from gpart.partition import group_ids

SOURCE = Path(__file__).parent / "native" / "floor.c"
CONFIGS = {  # name: (number of targets, target shape, d)
    "llama-like": (16, (1024, 1024), 131072),
    "roberta-like": (24, (768, 768), 23040),
    "tiny": (2, (64, 64), 100),  # smoke tests: a true modulo, one-part segment sum
    "tiny-pow2": (2, (256, 256), 64),  # smoke tests: a mask, two-halves segment sum
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["llama-like", "roberta-like"], choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default="native", help="name of the JSON file in benchmarks/results/")
    args = p.parse_args(argv)
    lib, why = _build()
    if lib is None:
        print(f"skipped: {why}")
        return {"skipped": why}
    lib.set_threads(torch.get_num_threads())  # the C library has its own OpenMP runtime
    result = {"machine": machine(), "compiler": why, "configs": {}}
    for name in args.configs:
        result["configs"][name] = _run(lib, *CONFIGS[name], args.repeats)
        _print(name, result["configs"][name])
    print(f"wrote {write_json(args.out, result)}")
    return result


def _build() -> tuple[ctypes.CDLL | None, str]:
    """Compile floor.c into a temporary shared library: (library, compiler line) or (None, why not)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler ($CC, cc or gcc)"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None, f"this CPU is not AVX-512 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    target = Path(tempfile.mkdtemp(prefix="gpart-native-")) / "floor.so"
    built = subprocess.run([cc, *flags, str(SOURCE), "-o", str(target)], capture_output=True, text=True)
    if built.returncode != 0:
        return None, f"{cc} failed: {built.stderr.strip()[:500]}"
    lib = ctypes.CDLL(str(target))
    lib.set_threads.argtypes = [ctypes.c_int]
    i64, u64, ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    lib.fused.argtypes = [ptr, ptr, ptr, i64, u64, u64, i64]
    lib.gather.argtypes = [ptr, ptr, ptr, ptr, i64]
    lib.segment_sum.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_int]
    return lib, " ".join([Path(cc).name, *flags[:3]])


def _run(lib, targets: int, shape: tuple[int, int], d: int, repeats: int) -> dict:
    torch.manual_seed(0)
    w0s = [torch.randn(*shape) for _ in range(targets)]
    grads = [torch.randn_like(w) for w in w0s]
    outs = [torch.empty_like(w) for w in w0s]
    n = w0s[0].numel()
    if n % 16 or d > 1 << 21:
        raise ValueError(f"floor.c takes multiples of 16 entries ({n}) and d <= 2**21 ({d})")
    starts = [i * n for i in range(targets)]
    size, seed = n * targets, 0
    theta, scale = torch.randn(d), torch.rand(d)
    table = theta * scale
    ids64 = [group_ids(s, n, d=d, seed=seed) for s in starts]
    ids32 = [i.int() for i in ids64]

    def c_fused():
        for w, o, s in zip(w0s, outs, starts, strict=True):
            lib.fused(w.data_ptr(), table.data_ptr(), o.data_ptr(), n, seed, s, d)

    def c_gather():
        for w, o, i in zip(w0s, outs, ids32, strict=True):
            lib.gather(w.data_ptr(), table.data_ptr(), i.data_ptr(), o.data_ptr(), n)

    parts = _delta._parts(n, d, torch.device("cpu"))  # gpart's split: two halves for large targets
    acc = torch.zeros(parts, d)

    def c_segment_sum(g, i):
        acc.zero_()
        lib.segment_sum(g.data_ptr(), i.data_ptr(), acc.data_ptr(), n, d, parts)
        return acc[0] if parts == 1 else acc[0] + acc[1]

    # Every C result against gpart's own kernels, bit for bit, before any timing.
    c_fused()
    for w, o, s in zip(w0s, outs, starts, strict=True):
        shipped = _delta.effective(w, theta, scale, start=s, seed=seed, backend="compiled")
        _same(o, shipped.detach(), "C fused forward vs gpart's compiled forward")
    c_gather()
    for w, o, i in zip(w0s, outs, ids64, strict=True):
        _same(o.reshape(-1), w.reshape(-1) + table[i], "C gather vs torch")
    for g, i in zip(grads, ids64, strict=True):
        _same(c_segment_sum(g, i), _delta._sum_whole(i, g.reshape(-1), d, d), "C segment sum vs gpart's")

    def shipped_forward():
        for w, s in zip(w0s, starts, strict=True):  # each W dropped at once, as in a training step
            _delta.effective(w, theta, scale, start=s, seed=seed, backend="compiled")

    gather = torch.compile(lambda w, t, i, o: o.copy_(w + torch.ops.aten._unsafe_index(t, [i])), dynamic=True)
    optimizers = {}
    for label, kwargs in (("AdamW (default)", {}), ("AdamW (fused=True)", {"fused": True})):
        params = [w.clone().requires_grad_() for w in w0s]
        for q, g in zip(params, grads, strict=True):
            q.grad = g.clone()
        optimizers[label] = torch.optim.AdamW(params, lr=1e-6, **kwargs)
    fns = {  # (row, implementation): one call over all targets
        ("copy W0 -> W", "torch"): lambda: [o.copy_(w) for o, w in zip(outs, w0s, strict=True)],
        ("forward W0 + delta", "torch"): shipped_forward,
        ("forward W0 + delta", "C"): c_fused,
        ("gather, ids in memory", "torch"): lambda: [
            gather(w.view(-1), table, i, o.view(-1)) for w, i, o in zip(w0s, ids32, outs, strict=True)
        ],
        ("gather, ids in memory", "C"): c_gather,
        ("segment sum, ids in memory", "torch"): lambda: [
            _delta._sum_whole(i, g.view(-1), d, d) for i, g in zip(ids64, grads, strict=True)
        ],
        ("segment sum, ids in memory", "C"): lambda: [
            c_segment_sum(g, i) for g, i in zip(grads, ids64, strict=True)
        ],
        **{(label, "torch"): opt.step for label, opt in optimizers.items()},
    }
    rows: dict[str, dict[str, float]] = {}
    for (row, impl), seconds in _interleaved(fns, repeats).items():
        rows.setdefault(row, {})[impl] = seconds / size * 1e9  # ns per entry
    fwd, seg = rows["forward W0 + delta"], rows["segment sum, ids in memory"]
    work = {k: 2 * fwd[k] + seg[k] for k in ("torch", "C")}
    copy = rows["copy W0 -> W"]["torch"]
    return {
        "targets": targets,
        "shape": list(shape),
        "d": d,
        "entries": size,
        "ns_per_entry": rows,
        "forward_x_copy": {k: copy / v for k, v in fwd.items()},
        "gpart_step_work_ns": work,
        "gpart_over_adamw": {
            a: {k: work[k] / rows[a]["torch"] for k in work}
            for a in ("AdamW (default)", "AdamW (fused=True)")
        },
    }


def _interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, timed in rounds (one call of each per round),
    so that the machine's drift hits every row alike."""
    times: dict = {key: [] for key in fns}
    for fn in fns.values():
        timed(fn, warmup=2, repeats=0)
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key] += timed(fn, warmup=0, repeats=1)
    return {key: median(t) for key, t in times.items()}


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.equal(a, b):
        bad = (a != b).sum().item()
        raise RuntimeError(f"{what}: {bad} of {a.numel()} entries differ; the C kernel is wrong")


def _print(name: str, r: dict) -> None:
    print(f"\n{name}: {r['targets']} targets of {tuple(r['shape'])}, D = {r['entries']:,}, d = {r['d']:,}")
    print(f"{'ns per entry':<30}{'torch':>9}{'C':>9}")
    for label, row in r["ns_per_entry"].items():
        c = f"{row['C']:>9.2f}" if "C" in row else f"{'':>9}"
        print(f"{label:<30}{row['torch']:>9.2f}{c}")
    w = r["gpart_step_work_ns"]
    print(f"{'gpart step work (2 fwd + sum)':<30}{w['torch']:>9.2f}{w['C']:>9.2f}")
    f = r["forward_x_copy"]
    print(f"{'forward, x copy':<30}{f['torch']:>9.2f}{f['C']:>9.2f}")
    for a, v in r["gpart_over_adamw"].items():
        print(f"{'gpart work / ' + a:<30}{v['torch']:>9.2f}{v['C']:>9.2f}")


if __name__ == "__main__":
    main()
