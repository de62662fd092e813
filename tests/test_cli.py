"""``python -m gpart``: inspect and convert, both directions, and clean failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import DATA
from test_peft_format import _bert, _expected

import gpart
from gpart.cli import main

OFFICIAL = DATA / "official_peft_checkpoint"


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["convert", "--help"]])
def test_help(args):
    out = subprocess.run([sys.executable, "-m", "gpart", *args], capture_output=True, text=True, check=False)
    assert out.returncode == 0
    assert "usage: python -m gpart" in out.stdout


def test_inspect_gpart_file(tmp_path, capsys):
    model = gpart.apply(_bert(), d=300, seed=5, targets=["query", "value"], trainable=["classifier"])
    with torch.no_grad():
        gpart.theta(model).copy_(torch.linspace(-1, 1, 300))
    path = gpart.save(model, tmp_path / "a.safetensors")
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "d             300" in text
    assert "D             16384" in text  # 4 tensors of 64 x 64
    assert "4 tensors, in canonical order" in text
    assert "bert.encoder.layer.0.attention.self.query.weight (64, 64)" in text
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == path.stat().st_size
    assert info["theta"]["min"] == -1.0 and info["theta"]["max"] == 1.0
    assert info["theta"]["norm"] == pytest.approx(float(torch.linspace(-1, 1, 300).double().norm()), abs=1e-6)
    assert info["other tensors"] == {"trainable.classifier.weight": [2, 64], "trainable.classifier.bias": [2]}


def test_inspect_reference_folder(capsys):
    assert main(["inspect", str(OFFICIAL), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["d"], info["seed"], info["settings"]["targets"]) == (1000, 7, ["query", "value"])
    assert info["other tensors"] == {"classifier.bias": [2], "classifier.weight": [2, 64]}


def _config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**_expected()["config"], "architectures": ["BertForSequenceClassification"]}))
    return path


def test_convert_reference_to_gpart_gives_the_same_model(tmp_path, capsys):
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(OFFICIAL), str(out), "--model-config", str(_config_file(tmp_path))]) == 0
    assert "wrote" in capsys.readouterr().out
    via_file = gpart.load(_bert(), out)
    via_folder = gpart.load_peft(_bert(), OFFICIAL)
    x = torch.randint(0, 100, (2, 10))
    assert torch.equal(via_file(input_ids=x).logits, via_folder(input_ids=x).logits)
    assert via_file.gpart.config == via_folder.gpart.config


def test_convert_gpart_to_reference_and_back(tmp_path):
    model = gpart.apply(_bert(), d=200, seed=1, targets=["query"], trainable=["classifier"], bias="all")
    with torch.no_grad():
        gpart.theta(model).normal_()
    path = gpart.save(model, tmp_path / "a.safetensors")
    assert main(["convert", str(path), str(tmp_path / "ref")]) == 0
    assert (
        main(
            [
                "convert",
                str(tmp_path / "ref"),
                str(tmp_path / "b.safetensors"),
                "--model-config",
                str(_config_file(tmp_path)),
                "--model-class",
                "BertForSequenceClassification",
            ]
        )
        == 0
    )
    a, b = gpart.read(path), gpart.read(tmp_path / "b.safetensors")
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert {k: a[1][k] for k in ("d", "seed", "D", "targets")} == {
        k: b[1][k] for k in ("d", "seed", "D", "targets")
    }


def test_failures_are_one_line_with_status(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gpart: error: no adapter file") and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        main(["convert", str(OFFICIAL), str(tmp_path / "x.safetensors")])
    assert info.value.code == 2
    assert "--model-config" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                str(OFFICIAL),
                str(tmp_path / "x.safetensors"),
                "--model-config",
                str(_config_file(tmp_path)),
                "--model-class",
                "NoSuchModel",
            ]
        )
        == 1
    )
    assert "NoSuchModel" in capsys.readouterr().err
    embedded = gpart.apply(_bert(), d=50, seed=0, targets=["word_embeddings", "query"])
    path = gpart.save(embedded, tmp_path / "e.safetensors")
    assert main(["convert", str(path), str(tmp_path / "ref")]) == 0  # 2-D weights: cannot tell from the file
    conv = gpart.apply(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3)), d=5, seed=0, targets=["0"])
    assert main(["convert", str(gpart.save(conv, tmp_path / "c.safetensors")), str(tmp_path / "ref2")]) == 1
    assert "not 2-D module weights" in capsys.readouterr().err
