"""Aggregate ViT run folders into a table (mean/median ± std over seeds per dataset, parameter counts).

python examples/vision/collect_results_ViT.py runs/vit [--latex]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cli, runs


def main(argv: list[str] | None = None) -> str:
    return runs.collector_main(argv, doc=__doc__, default_root="runs/vit")


if __name__ == "__main__":
    sys.exit(cli.entry(main))
