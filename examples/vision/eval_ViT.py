"""Evaluate a trained adapter on a dataset's test split with ViT, on merged weights.

    python examples/vision/eval_ViT.py --adapter_path runs/vit/fgvc/gpart-base/seed42 --dataset fgvc
    python examples/vision/eval_ViT.py --adapter_path <the reference's adapter folder> --dataset cifar100

``--adapter_path`` takes a gpart file, a run folder of ``finetune_ViT.py`` (its
``adapter.safetensors`` holds theta and the trained head) or a folder saved by the reference
(``adapter_config.json`` + ``adapter_model.safetensors``, read with ``gpart.load_peft``). The
adapter is merged into the weights before the first batch. Prints and returns the accuracy per
dataset; with ``--output_dir`` also writes ``eval_<dataset>.json`` there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_ViT as vit
from common import adapters, cli


def _adapter_path(p) -> None:
    p.add_argument("--adapter_path", required=True, help="gpart file, run folder or reference folder")


def main(argv: list[str] | None = None, loaders: vit.Loaders = vit.HUB) -> list[dict]:
    args, cfgs = cli.configs(
        argv, doc=__doc__, presets=vit.PRESETS, spec=vit.SPEC, output_dir="", extra=_adapter_path
    )
    if args.dry_run:
        return cli.dry_run(cfgs)
    if not Path(args.adapter_path).exists():
        raise cli.RunnerError(f"--adapter_path {args.adapter_path!r} does not exist")
    results = []
    for cfg in cfgs:
        test = vit.split(loaders.data(cfg.task.name, cfg), cfg)["test"]
        model = vit.prepare(loaders.model(cfg), cfg)
        adapters.load_merged(model, args.adapter_path)
        model.eval()
        value = vit.accuracy(model, test, cfg)
        result = {
            "task": cfg.task.name,
            "metric": "accuracy",
            "test_metric": value,
            "adapter": args.adapter_path,
        }
        print(f"{cfg.task.name}: accuracy {value:.4f}")
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / f"eval_{cfg.task.name}.json").write_text(
                json.dumps(result, indent=2) + "\n"
            )
        results.append(result)
    return results


if __name__ == "__main__":
    sys.exit(cli.entry(main))
