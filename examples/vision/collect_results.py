"""Aggregate ViT run folders into a table (mean/median ± std over seeds per dataset, parameter counts).

python examples/vision/collect_results.py runs/vit [--latex]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import runs


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="runs/vit")
    p.add_argument("--latex", action="store_true")
    args = p.parse_args(argv)
    rows = runs.collect(args.root)
    if not rows:
        raise SystemExit(f"no final.json under {args.root}: run finetune_vit.py first")
    text = runs.table(rows, latex=args.latex)
    print(text)
    return text


if __name__ == "__main__":
    main()
