"""Two tasks, one frozen model: train an adapter per task, serve both, swap per request.

    python examples/multi_adapter.py          # ~10 s on a laptop CPU, no downloads

1. "Pretrain" a small MLP on a base task (a stand-in for a downloaded checkpoint).
2. Train adapter ``a`` for task A, then adapter ``b`` (another seed) for task B on the same frozen
   model: each ``apply`` adds an adapter and makes it the active one.
3. Serve both from one model: per request, ``gpart.set_active`` picks the task's adapter (no
   re-registration, nothing recomputed beyond the next forward).
4. Serve from a model with a single adapter slot instead: ``gpart.load(model, file, name="serve")``
   swaps the slot's theta (and here its seed) in place.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gpart

DIM = 16


def labels(task: str, x: torch.Tensor) -> torch.Tensor:
    """The rule of each task: a sign of a fixed projection of the input."""
    g = torch.Generator().manual_seed({"base": 0, "a": 1, "b": 2}[task])
    w = torch.randn(DIM, generator=g)
    return (x @ w > 0).long()


def data(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return x, labels(task, x)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad(), gpart.cached(model):  # every delta computed once for the whole batch
        return (model(x).argmax(-1) == y).float().mean().item()


def fit(model: nn.Module, params, task: str, *, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    x, y = data(task, 2048, seed=10)
    model.train()
    for step in range(steps):
        batch = slice((step * 128) % 2048, (step * 128) % 2048 + 128)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
    fit(model, model.parameters(), "base", steps=300, lr=1e-2)
    tests = {task: data(task, 1000, seed=20) for task in ("a", "b")}

    # 2. one adapter per task, on the same frozen weights
    tmp = Path(tempfile.mkdtemp())
    for task, seed in (("a", 0), ("b", 1)):
        gpart.apply(model, d=512, seed=seed, targets="all-linear", name=task)  # the new one is active
        fit(model, [gpart.theta(model, task)], task, steps=400, lr=5e-2)
        gpart.save(model, tmp / f"{task}.safetensors", name=task)
    print("adapters:", gpart.adapters(model))

    # 3. serve both: each request picks its task's adapter
    results = {}
    for adapter in ("a", "b"):
        gpart.set_active(model, adapter)
        for task, (x, y) in tests.items():
            results[f"adapter {adapter} on task {task}"] = accuracy(model, x, y)
    gpart.set_active(model, [])
    for task, (x, y) in tests.items():
        results[f"no adapter on task {task}"] = accuracy(model, x, y)
    for label, acc in results.items():
        print(f"  {label:<22} accuracy {acc:.3f}")

    # 4. one adapter slot, swapped per request by loading a file into it
    served = gpart.remove(gpart.remove(model, name="a"), name="b")  # the plain base model again
    gpart.load(served, tmp / "a.safetensors", name="serve")
    swaps = []
    for task in ("b", "a", "b"):
        start = time.perf_counter()
        gpart.load(served, tmp / f"{task}.safetensors", name="serve")  # another seed: swapped in place
        swaps.append(time.perf_counter() - start)
        x, y = tests[task]
        results[f"slot serving {task}"] = accuracy(served, x, y)
    print(
        f"  slot swaps: median {sorted(swaps)[1] * 1e3:.2f} ms; accuracy after the last: "
        f"{results['slot serving b']:.3f}"
    )
    return results


if __name__ == "__main__":
    main()
