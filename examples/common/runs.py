"""Run folders: one per (runner, task, adapter, size, seed); JSON lines per epoch; a collector."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def run_dir(cfg) -> Path:
    return (
        Path(cfg.output_dir)
        / cfg.task.name
        / f"{cfg.adapter.kind}-{cfg.model_size}"
        / f"seed{cfg.training.seed}"
    )


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def collect(root: str | Path) -> list[dict]:
    """Every ``final.json`` under ``root``."""
    return [json.loads(p.read_text()) for p in sorted(Path(root).rglob("final.json"))]


def table(rows: list[dict], *, metric_key: str = "test_metric", latex: bool = False) -> str:
    """Per adapter and task: mean, median and std over seeds of the test metric, with parameter counts.

    Rows come from :func:`collect`; each has ``task``, ``adapter_type``, ``model_size``, ``seed``,
    ``params`` and the metric. Returns a Markdown table (or LaTeX with ``latex=True``).
    """
    groups: dict[tuple[str, str], dict[str, list]] = {}
    tasks = sorted({r["task"] for r in rows})
    for r in rows:
        key = (f"{r['adapter_type']} ({r['model_size']})", r["task"])
        groups.setdefault(key, {"values": [], "params": r["params"]})["values"].append(100 * r[metric_key])
    methods = sorted({k[0] for k in groups})
    header = ["method", "trainable", *tasks, "avg"]
    body = []
    for m in methods:
        cells, means = [], []
        params = next(g["params"] for (mm, _), g in groups.items() if mm == m)
        for t in tasks:
            g = groups.get((m, t))
            if g is None:
                cells.append("-")
                continue
            v = g["values"]
            mean, med = statistics.mean(v), statistics.median(v)
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            means.append(mean)
            cells.append(f"{mean:.1f} / {med:.1f} ± {std:.1f} (n={len(v)})")
        avg = f"{statistics.mean(means):.1f}" if means else "-"
        body.append([m, f"{params['trainable']:,}", *cells, avg])
    if latex:
        lines = ["\\begin{tabular}{" + "l" * len(header) + "}", " & ".join(header) + " \\\\", "\\hline"]
        lines += [" & ".join(c.replace("±", "$\\pm$") for c in row) + " \\\\" for row in body]
        return "\n".join([*lines, "\\end{tabular}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n\nCells: mean / median ± std over seeds (metric x 100)."


def collector_main(argv, *, doc: str, default_root: str) -> str:
    """The ``collect_results_*.py`` command line of the classification runners."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default=default_root)
    p.add_argument("--latex", action="store_true")
    args = p.parse_args(argv)
    rows = collect(args.root)
    if not rows:
        from .cli import RunnerError

        raise RunnerError(f"no final.json under {args.root}: run the runner first, or pass its --output_dir")
    text = table(rows, latex=args.latex)
    print(text)
    return text
