"""Quickstart: transfer a small network to new classes with head-only, GPart and full fine-tuning.

Runs on CPU in well under a minute with no downloads, on scikit-learn's bundled digits data:

1. pretrain an MLP on digits 0-4;
2. fine-tune it on digits 5-9 three ways (new head only; GPart on the body + new head; everything);
3. print trainable parameters, test accuracy and time for each;
4. save the GPart adapter, load it into a fresh copy of the pretrained model, and check the
   predictions are identical.

    python examples/quickstart.py            # the README's first command runs this
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import gpart


def split(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits 0-4 for pretraining; digits 5-9 (relabelled 0-4) split into train and test halves."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    old, new = y < 5, y >= 5
    perm = torch.randperm(int(new.sum()), generator=torch.Generator().manual_seed(seed))
    xn, yn = x[new][perm], y[new][perm] - 5
    half = len(perm) // 2
    return {"pretrain": (x[old], y[old]), "train": (xn[:half], yn[:half]), "test": (xn[half:], yn[half:])}


def make_model(hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 5)
    )


def fit(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], groups: list[dict], epochs: int) -> None:
    """Minibatch AdamW on the given parameter groups."""
    x, y = data
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x).argmax(-1)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs per method")
    parser.add_argument("--d", type=int, default=1024, help="GPart's number of trainable parameters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the adapter (default: a temp folder)"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = split(args.seed)
    pretrained = make_model()
    fit(pretrained, data["pretrain"], [{"params": pretrained.parameters(), "lr": 1e-3}], epochs=args.epochs)

    def fresh_head_copy() -> nn.Module:
        model = copy.deepcopy(pretrained)
        torch.manual_seed(args.seed + 1)  # the same new head for every method
        model[4].reset_parameters()
        return model

    results: dict[str, dict] = {}
    models: dict[str, nn.Module] = {}
    for method in ("head-only", "gpart", "full"):
        model = fresh_head_copy()
        start = time.perf_counter()
        if method == "head-only":
            model.requires_grad_(False)
            model[4].requires_grad_(True)
            groups = [{"params": model[4].parameters(), "lr": 3e-3}]
        elif method == "gpart":
            gpart.apply(model, d=args.d, seed=args.seed, targets=["0", "2"], trainable=["4"])
            groups = [
                {"params": [gpart.theta(model)], "lr": 2e-2},  # theta wants ~10x a head's lr
                {"params": model[4].parameters(), "lr": 3e-3},
            ]
        else:
            groups = [{"params": model.parameters(), "lr": 1e-3}]
        fit(model, data["train"], groups, epochs=args.epochs)
        seconds = time.perf_counter() - start
        x, y = data["test"]
        accuracy = (predict(model, x) == y).float().mean().item()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[method] = {"trainable": trainable, "accuracy": accuracy, "seconds": seconds}
        models[method] = model

    total = sum(p.numel() for p in pretrained.parameters())
    print(
        f"Fine-tuning a digits 0-4 MLP ({total:,} parameters) on digits 5-9 ({len(data['train'][0])} images)"
    )
    print(f"{'method':<10} {'trainable':>10} {'% of model':>11} {'test acc':>9} {'time (s)':>9}")
    for method, r in results.items():
        share = 100 * r["trainable"] / total
        print(
            f"{method:<10} {r['trainable']:>10,} {share:>10.2f}% {r['accuracy']:>9.3f} {r['seconds']:>9.2f}"
        )

    # Save the GPart adapter (theta + the new head), reload it into a fresh pretrained model.
    out = args.out or Path(tempfile.mkdtemp(prefix="gpart-quickstart-"))
    out.mkdir(parents=True, exist_ok=True)
    path = gpart.save(models["gpart"], out / "digits-5-9.safetensors")
    reloaded = gpart.load(copy.deepcopy(pretrained), path)
    x, _ = data["test"]
    same = torch.equal(predict(reloaded, x), predict(models["gpart"], x))
    logits_equal = torch.equal(reloaded(x), models["gpart"](x))
    print(f"\nsaved {path} ({path.stat().st_size:,} bytes); {gpart.summary(reloaded)}")
    print(f"reloaded into a fresh pretrained model: identical predictions: {same}, logits: {logits_equal}")
    results["reload_identical"] = {"predictions": same, "logits": logits_equal}
    return results


if __name__ == "__main__":
    main()
