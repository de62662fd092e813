"""gpart's fixed cost per target per training step, against the same model fully trainable.

    python benchmarks/bench_overhead.py                     # the grid below, ~5 minutes on 2 cores
    python benchmarks/bench_overhead.py --widths 64 --targets 32 --rounds 5
    python benchmarks/bench_overhead.py --device cuda       # on a GPU

The model is a stack of ``N`` square ``nn.Linear(w, w)`` layers (batch 8), every weight a target
(d = 512). One step is a forward and a backward, no optimizer: what differs between the methods
is only how each target weight is made and how its gradient flows. Methods:

* ``full``: the weights trainable (their gradients computed, nothing else);
* ``bare``: a bare ``torch.nn.utils.parametrize`` parametrization ``W0 + theta[ids]`` with the
  group ids stored (D int64 kept): the least a parametrization costs;
* ``gpart``, ``gpart-drop`` (dropout 0.1), ``gpart-c``, ``gpart-c-drop``: gpart with the eager or
  the compiled kernel (``backend="eager"`` is what ``"auto"`` picks at these sizes).

Each round times every method in turn, ``--steps`` steps each after a warm-up, and keeps the
median step; the overhead per target is ``(step - full step) / N`` per round, reported as the
median over rounds with its spread. A profile of one configuration (``--profile``, default width
64 x 32 targets) splits a gpart step into tensor ops (count and time per target), the autograd
engine and Python. Writes ``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine, write_json
from torch import nn
from torch.nn.utils import parametrize

import gpart
from gpart.partition import group_ids

D_THETA = 512
BATCH = 8
METHODS = ("full", "bare", "gpart", "gpart-drop", "gpart-c", "gpart-c-drop")
_GPART = {
    "gpart": {"backend": "eager"},
    "gpart-drop": {"backend": "eager", "dropout": 0.1},
    "gpart-c": {"backend": "compiled"},
    "gpart-c-drop": {"backend": "compiled", "dropout": 0.1},
}


class _Bare(nn.Module):
    """``W0 + theta[ids]``: a parametrization with the ids stored, no hash, no scale."""

    def __init__(self, theta: nn.Parameter, ids: torch.Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "theta", theta)
        self.register_buffer("ids", ids)

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.theta[self.ids].view_as(w0)


def build(method: str, width: int, n: int, device: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(n)]).to(device)
    model.requires_grad_(False)
    x = torch.randn(BATCH, width, device=device)
    if method == "full":
        for layer in model:
            layer.weight.requires_grad_(True)
    elif method == "bare":
        model.theta = nn.Parameter(torch.zeros(D_THETA, device=device))
        for i, layer in enumerate(model):
            if isinstance(layer, nn.Linear):
                ids = group_ids(i * width * width, width * width, d=D_THETA, seed=0, device=device)
                parametrize.register_parametrization(layer, "weight", _Bare(model.theta, ids), unsafe=True)
    else:
        gpart.apply(model, d=D_THETA, seed=0, targets="all-linear", **_GPART[method])
    return model.train(), x


def _step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()
    for p in model.parameters():
        p.grad = None
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def _median_step(model, x, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _step(model, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(width: int, n: int, methods, rounds: int, steps: int, device: str) -> dict:
    models = {m: build(m, width, n, device) for m in methods}
    for model, x in models.values():  # warm-up: first-call costs (compilation, allocator)
        for _ in range(3):
            _step(model, x)
    per_round: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            per_round[m].append(_median_step(*models[m], steps))
    out = {}
    for m in methods:
        extra = [(t - f) / n * 1e6 for t, f in zip(per_round[m], per_round["full"], strict=True)]
        out[m] = {
            "step_ms": statistics.median(per_round[m]) * 1e3,
            "us_per_target": statistics.median(extra),
            "us_per_target_spread": [min(extra), max(extra)],
        }
    return out


def profile(width: int, n: int, method: str, device: str, steps: int = 10) -> dict:
    """Where a step's time goes, from torch's profiler: tensor ops (top-level calls per target,
    self time), compiled-region calls (each one Dynamo guard check), the autograd engine, and the
    rest (Python frames, module and hook dispatch). Shares of the profiled step: the profiler
    slows every op down, so the absolute times are larger than the unprofiled ones."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, x = build(method, width, n, device)
    for _ in range(5):
        _step(model, x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            _step(model, x)
    wall = (time.perf_counter() - start) / steps
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    top_level = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    aten_self = sum(e.self_cpu_time_total for e in aten) / 1e6 / steps
    engine = [e for e in events if e.name.startswith("autograd::engine") and e.cpu_parent is None]
    compiled = [e for e in events if e.name == "TorchDynamo Cache Lookup"]  # one guard check each
    engine_self = sum(e.cpu_time_total for e in engine) / 1e6 / steps
    totals: dict[str, float] = {}
    for e in aten:
        totals[e.name] = totals.get(e.name, 0.0) + e.self_cpu_time_total / steps
    return {
        "method": method,
        "width": width,
        "targets": n,
        "step_ms_profiled": wall * 1e3,
        "aten_calls_per_target": len(top_level) / steps / n,
        "compiled_calls_per_target": len(compiled) / steps / n,
        "aten_share": aten_self / wall,
        "autograd_engine_share": engine_self / wall,
        "top_ops_us_per_step": dict(sorted(totals.items(), key=lambda kv: -kv[1])[:8]),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", nargs="+", type=int, default=[64, 256, 1024])
    p.add_argument("--targets", nargs="+", type=int, default=[4, 32, 128])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method per round (fewer for big)")
    p.add_argument("--profile", nargs=2, type=int, default=[64, 32], metavar=("WIDTH", "TARGETS"))
    p.add_argument("--out", default="overhead")
    args = p.parse_args(argv)
    methods = ["full", *[m for m in args.methods if m != "full"]]

    rows = []
    print(f"{'width':>5} {'N':>4} " + " ".join(f"{m:>14}" for m in methods[1:]) + "   (us per target)")
    for width in args.widths:
        for n in args.targets:
            # Big configs take long per step: fewer steps keep each cell near the same wall time.
            steps = max(3, min(args.steps, int(args.steps * 64 * 64 * 32 / (width * width * n))))
            res = measure(width, n, methods, args.rounds, steps, args.device)
            rows.append({"width": width, "targets": n, "steps": steps, **res})
            cells = " ".join(f"{res[m]['us_per_target']:>14.1f}" for m in methods[1:])
            print(f"{width:>5} {n:>4} {cells}   full step {res['full']['step_ms']:.2f} ms")
    profiles = [profile(*args.profile, m, args.device) for m in methods]
    print(f"\nprofile of width {args.profile[0]}, {args.profile[1]} targets (shares of the profiled step)")
    base = profiles[0]["aten_calls_per_target"]  # full: the layer's own ops
    for pr in profiles[1:]:
        pr["extra_aten_calls_per_target"] = pr["aten_calls_per_target"] - base
        print(
            f"  {pr['method']:<13} {pr['extra_aten_calls_per_target']:+5.1f} tensor ops and "
            f"{pr['compiled_calls_per_target']:.2f} compiled calls per target vs full; tensor ops "
            f"{pr['aten_share']:4.0%}, autograd engine (incl. its ops) {pr['autograd_engine_share']:4.0%}"
        )
    payload = {"machine": machine(), "batch": BATCH, "d": D_THETA, "rows": rows, "profiles": profiles}
    path = write_json(args.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
