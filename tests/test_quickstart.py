"""The README's first command: the quickstart demo runs end to end and reloads identically."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_and_reloads_identically(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--epochs", "4", "--d", "256", "--out", str(tmp_path)])
    assert results["reload_identical"] == {"predictions": True, "logits": True}
    assert results["gpart"]["trainable"] == 256 + 256 * 5 + 5
    assert results["head-only"]["trainable"] < results["gpart"]["trainable"] < results["full"]["trainable"]
    assert (tmp_path / "digits-5-9.safetensors").is_file()
    out = capsys.readouterr().out
    assert "head-only" in out and "identical predictions: True" in out
