"""Aggregate GLUE run folders into a table: per task, mean/median and std over seeds, parameter counts.

python examples/glue/collect_results_glue.py runs/glue            # Markdown
python examples/glue/collect_results_glue.py runs/glue --latex
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cli, runs


def main(argv: list[str] | None = None) -> str:
    return runs.collector_main(argv, doc=__doc__, default_root="runs/glue")


if __name__ == "__main__":
    sys.exit(cli.entry(main))
