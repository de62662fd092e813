"""The runners' shared training loop: AdamW groups, linear/cosine schedule with warmup, gradient
accumulation, autocast on a GPU, per-epoch validation with best-epoch selection, run folder."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from . import adapters, runs
from .config import save_config


def start(cfg) -> Path:
    """Seed everything and create the run folder with the resolved config; return the folder."""
    random.seed(cfg.training.seed)
    torch.manual_seed(cfg.training.seed)
    folder = runs.run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").unlink(missing_ok=True)
    save_config(cfg, folder / "config.json")
    return folder


def _autocast(cfg, device: torch.device):
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if device.type != "cuda" or cfg.training.precision not in dtypes:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtypes[cfg.training.precision])


def fit(
    cfg,
    model: torch.nn.Module,
    folder: Path,
    *,
    head: list[str],
    train_batches: Callable[[int], Iterable[tuple[dict, torch.Tensor]]],
    steps_per_epoch: int,
    evaluate: Callable[[str], float],
) -> dict:
    """Train ``model`` with ``cfg``'s adapter; ``evaluate("val"|"test")`` returns the task metric."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    t = cfg.training
    device = next(model.parameters()).device
    adapter_params, head_params = adapters.setup(model, cfg.adapter, head=head, seed=t.seed)
    params = adapters.count(adapter_params, head_params, model)
    opt = torch.optim.AdamW(adapters.param_groups(adapter_params, head_params, t, kind=cfg.adapter.kind))
    updates = max(1, steps_per_epoch // t.grad_accum) * t.epochs
    schedule = get_cosine_schedule_with_warmup if t.schedule == "cosine" else get_linear_schedule_with_warmup
    sched = schedule(opt, int(t.warmup_ratio * updates), updates)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and t.precision == "fp16")
    trained = [p for g in opt.param_groups for p in g["params"]]
    best = (-float("inf"), 0, None)
    for epoch in range(1, t.epochs + 1):
        model.train()
        losses = []
        for step, (inputs, labels) in enumerate(
            tqdm(
                train_batches(epoch),
                total=steps_per_epoch,
                desc=f"{cfg.task.name} epoch {epoch}",
                leave=False,
            ),
            start=1,
        ):
            with _autocast(cfg, device):
                loss = model(**inputs, labels=labels).loss
            scaler.scale(loss / t.grad_accum).backward()
            losses.append(loss.item())
            if step % t.grad_accum == 0 or step == steps_per_epoch:
                if t.max_grad_norm:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(trained, t.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                sched.step()
                opt.zero_grad(set_to_none=True)
        model.eval()
        with _autocast(cfg, device), adapters.inference(model):
            val = evaluate("val")
        record = {"epoch": epoch, "train_loss": sum(losses) / max(1, len(losses)), "val_metric": val}
        runs.append_jsonl(folder / "metrics.jsonl", record)
        print(
            f"{cfg.task.name} {cfg.adapter.kind} seed {t.seed} epoch {epoch}: "
            f"loss {record['train_loss']:.4f} val {cfg.task.metric} {val:.4f}"
        )
        if t.model_selection == "last" or val > best[0]:
            best = (val, epoch, adapters.trainable_state(model))
    adapters.restore(model, best[2])
    model.eval()
    with _autocast(cfg, device), adapters.inference(model):
        test = evaluate("test")
    adapters.save_adapter(model, folder / "adapter.safetensors")
    final = {
        "task": cfg.task.name,
        "adapter_type": cfg.adapter.kind,
        "model_size": cfg.model_size,
        "model_name": cfg.model_name,
        "seed": t.seed,
        "metric": cfg.task.metric,
        "best_epoch": best[1],
        "val_metric": best[0],
        "test_metric": test,
        "params": params,
    }
    (folder / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    print(
        f"{cfg.task.name} {cfg.adapter.kind} seed {t.seed}: best epoch {best[1]}, "
        f"test {cfg.task.metric} {test:.4f}"
    )
    return final


def main_loop(
    argv,
    *,
    doc: str,
    presets,
    output_dir: str,
    run: Callable,
    params_only: Callable,
    spec=None,
) -> list:
    """A classification runner's command line (:mod:`common.cli`): one run, parameter count or
    printed config per task and seed."""
    from . import cli

    args, cfgs = cli.configs(argv, doc=doc, presets=presets, spec=spec or cli.Spec(), output_dir=output_dir)
    if args.dry_run:
        return cli.dry_run(cfgs)
    return [params_only(cfg) if args.compute_params_only else run(cfg) for cfg in cfgs]
