"""Aggregate math evaluations (``eval.json`` files) into a table: GSM8K and MATH accuracy per run.

python examples/math/collect_results.py runs/math_eval [--latex]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cli


def collect_results(root: str | Path, *, latex: bool = False) -> str:
    groups: dict[str, dict[str, list[float]]] = {}
    for path in sorted(Path(root).rglob("eval.json")):
        result = json.loads(path.read_text())
        key = result["model_name"] + (" + gpart" if result.get("adapter") else " (base)")
        for bench in ("gsm8k", "math"):
            if bench in result:
                groups.setdefault(key, {}).setdefault(bench, []).append(result[bench]["accuracy"])
    if not groups:
        raise cli.RunnerError(f"no eval.json under {root}: run eval_math.py first, or pass its --output")
    header = ["model", "GSM8K", "MATH"]
    body = []
    for key, benches in groups.items():
        cells = []
        for bench in ("gsm8k", "math"):
            v = benches.get(bench, [])
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(
                f"{statistics.mean(v):.2f} / {statistics.median(v):.2f} ± {std:.2f} (n={len(v)})"
                if v
                else "-"
            )
        body.append([key, *cells])
    if latex:
        rows = [" & ".join(c.replace("±", "$\\pm$") for c in r) + " \\\\" for r in body]
        return "\n".join(
            ["\\begin{tabular}{lll}", " & ".join(header) + " \\\\", "\\hline", *rows, "\\end{tabular}"]
        )
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|---|---|---|", *("| " + " | ".join(r) + " |" for r in body)]
    )


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="runs/math_eval")
    p.add_argument("--latex", action="store_true")
    args = p.parse_args(argv)
    text = collect_results(args.root, latex=args.latex)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(cli.entry(main))
