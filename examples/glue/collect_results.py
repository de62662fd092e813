"""Aggregate GLUE run folders into a table: per task, mean/median and std over seeds, parameter counts.

python examples/glue/collect_results.py runs/glue            # Markdown
python examples/glue/collect_results.py runs/glue --latex
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import runs


def collect_results(root: str | Path, *, latex: bool = False) -> str:
    rows = runs.collect(root)
    if not rows:
        raise SystemExit(f"no final.json under {root}: run finetune_roberta_glue.py first")
    return runs.table(rows, latex=latex)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="runs/glue")
    p.add_argument("--latex", action="store_true")
    args = p.parse_args(argv)
    text = collect_results(args.root, latex=args.latex)
    print(text)
    return text


if __name__ == "__main__":
    main()
