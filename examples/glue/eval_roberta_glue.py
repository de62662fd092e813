"""Evaluate a trained adapter on GLUE dev sets (the reported test sets), on merged weights.

    python examples/glue/eval_roberta_glue.py --adapter_path runs/glue/rte/gpart-base/seed42 --tasks rte
    python examples/glue/eval_roberta_glue.py --adapter_path <the reference's adapter folder> --tasks sst2
    python examples/glue/eval_roberta_glue.py --adapter_path a.safetensors --tasks mrpc --model_size large

``--adapter_path`` takes a gpart file, a run folder of ``finetune_roberta_glue.py`` (its
``adapter.safetensors`` holds theta and the trained head) or a folder saved by the reference
(``adapter_config.json`` + ``adapter_model.safetensors``, read with ``gpart.load_peft``). The
adapter is merged into the weights before the first batch. Prints and returns the metric per task;
with ``--output_dir`` also writes ``eval_<task>.json`` there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_roberta_glue as glue
from common import adapters, cli


def _adapter_path(p) -> None:
    p.add_argument("--adapter_path", required=True, help="gpart file, run folder or reference folder")


def main(argv: list[str] | None = None, loaders: glue.Loaders = glue.HUB) -> list[dict]:
    args, cfgs = cli.configs(
        argv, doc=__doc__, presets=glue.PRESETS, spec=glue.SPEC, output_dir="", extra=_adapter_path
    )
    if args.dry_run:
        return cli.dry_run(cfgs)
    if not Path(args.adapter_path).exists():
        raise cli.RunnerError(f"--adapter_path {args.adapter_path!r} does not exist")
    results = []
    for cfg in cfgs:
        model, tokenizer = loaders.model(cfg)
        adapters.load_merged(model, args.adapter_path)
        model.eval()
        rows = loaders.data(cfg.task.name)["validation"]
        value = glue.evaluate(model, rows, tokenizer, glue.TASKS[cfg.task.name][0], cfg)
        result = {
            "task": cfg.task.name,
            "metric": cfg.task.metric,
            "test_metric": value,
            "adapter": args.adapter_path,
        }
        print(f"{cfg.task.name}: {cfg.task.metric} {value:.4f}")
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / f"eval_{cfg.task.name}.json").write_text(
                json.dumps(result, indent=2) + "\n"
            )
        results.append(result)
    return results


if __name__ == "__main__":
    sys.exit(cli.entry(main))
