"""The reference's README commands, as README.md maps them, run here in a dry mode; bad input
ends in one line, never a traceback."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from common import cli  # noqa: E402

SCRIPTS = sorted(p for p in (ROOT / "examples").glob("*/*.py") if p.parent.name in {"glue", "vision", "math"})
ENTRY_POINTS = [p for p in SCRIPTS if p.name != "answers.py"]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_ref_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def table() -> list[tuple[str, str]]:
    """(reference command, our command) rows of README's "Coming from the reference" table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Coming from the reference") :]
    section = section[section.index("| the reference | here |") :]
    rows = []
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            break
        left, right = re.findall(r"`([^`]*)`", line)[:1] + re.findall(r"`([^`]*)`", line)[-1:]
        rows.append((left, right))
    return rows


ROWS = table()

GPART_BASE = {
    "cola": (80, 2e-3),
    "sst2": (60, 5e-4),
    "mrpc": (30, 1e-3),
    "qnli": (25, 1e-3),
    "rte": (160, 1e-2),
}
GPART_BASE["stsb"] = (80, 2e-4)
GPART_LARGE = {
    "cola": (60, 2e-2),
    "sst2": (30, 2e-4),
    "mrpc": (40, 2e-3),
    "qnli": (25, 5e-3),
    "rte": (120, 5e-3),
}
GPART_LARGE["stsb"] = (80, 1e-4)
VERA_EPOCHS = {"cola": 80, "sst2": 60, "mrpc": 30, "qnli": 25, "rte": 80, "stsb": 40}
GLUE_ORDER = ["cola", "sst2", "mrpc", "stsb", "qnli", "rte"]


def glue_recipe(cfgs, per_task, *, seed=42, tasks=GLUE_ORDER, lr=5e-3, head=None, batch=32, d=23_040):
    """What the reference's config system resolves for gpart on GLUE."""
    assert [c["task"]["name"] for c in cfgs] == list(tasks)
    for c in cfgs:
        epochs, head_lr = per_task[c["task"]["name"]]
        t, a = c["training"], c["adapter"]
        assert (t["epochs"], t["head_lr"], t["lr"]) == (epochs, head if head else head_lr, lr)
        assert (t["batch_size"], t["max_seq_length"], t["weight_decay"], t["warmup_ratio"]) == (
            batch,
            512,
            0.1,
            0.06,
        )
        assert (t["seed"], t["model_selection"], t["precision"]) == (seed, "best", "fp32")
        assert (a["d"], a["dropout"], a["targets"], a["init_bound"]) == (d, 0.1, ["query", "value"], 0.0)
        assert a["seed"] is None  # the partition seed follows the run seed, as in the reference


def vit_recipe(c, *, task, d, batch, lr=4e-3, head_lr=3e-3, epochs=20):
    t, a = c["training"], c["adapter"]
    assert c["task"]["name"] == task and a["d"] == d and a["dropout"] == 0.0
    assert (t["lr"], t["head_lr"], t["epochs"], t["batch_size"], t["grad_accum"]) == (
        lr,
        head_lr,
        epochs,
        batch,
        4,
    )
    assert (t["weight_decay"], t["warmup_ratio"], t["schedule"], t["precision"], t["seed"]) == (
        0.01,
        0.4,
        "linear",
        "fp16",
        42,
    )
    assert a["assignment_backend"] == "materialized" and a["targets"] == ["query", "value"]


def math_recipe(c, *, model, d, lr=2e-4, batch=2, accum=8):
    t, a = c["training"], c["adapter"]
    assert c["model_name"] == model and a["d"] == d and a["dropout"] == 0.05
    assert a["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (t["lr"], t["batch_size"], t["grad_accum"], t["epochs"], t["schedule"]) == (
        lr,
        batch,
        accum,
        2,
        "cosine",
    )
    assert (t["warmup_ratio"], t["weight_decay"], t["max_grad_norm"], t["max_seq_length"], t["seed"]) == (
        0.05,
        0.01,
        1.0,
        2048,
        42,
    )


def check_overrides(cfgs):
    for c in cfgs:
        assert c["adapter"]["d"] == 16_384 and c["adapter"]["isometric"] is False
        assert c["training"]["batch_size"] == 16
        # The command line wins here (README: "Overrides win"); the reference's per-task values
        # would shadow training.lr / training.head_lr.
        assert (c["training"]["lr"], c["training"]["head_lr"]) == (0.001, 0.002)


def check_vera(cfgs):
    assert [c["task"]["name"] for c in cfgs] == GLUE_ORDER
    for c in cfgs:
        t, a = c["training"], c["adapter"]
        assert (a["r"], a["d_initial"], a["dropout"], a["projection_prng_key"]) == (8, 0.1, 0.1, 0)
        assert (t["lr"], t["head_lr"], t["epochs"]) == (1e-3, 1e-3, VERA_EPOCHS[c["task"]["name"]])


EXPECTED = [
    lambda r: glue_recipe(r, GPART_BASE),
    lambda r: glue_recipe(r, GPART_LARGE),
    lambda r: glue_recipe(r, GPART_BASE, seed=123, tasks=["sst2", "qnli"]),
    lambda r: [c["adapter"] for c in r] == [23_040] * 6 or pytest.fail(str(r)),
    check_overrides,
    check_vera,
    lambda r: "| gpart (base) |" in r or pytest.fail(r),
    lambda r: vit_recipe(r[0], task="fgvc", d=72_000, batch=64),
    lambda r: vit_recipe(r[0], task="cifar100", d=144_000, batch=32),
    lambda r: vit_recipe(r[0], task="flowers102", d=72_000, batch=64, lr=6e-3, head_lr=5e-3, epochs=30),
    lambda r: "| gpart (base) |" in r or pytest.fail(r),
    lambda r: math_recipe(r[0], model="Qwen/Qwen2.5-0.5B", d=131_072),
    lambda r: math_recipe(r[0], model="Qwen/Qwen2.5-7B", d=524_288),
    lambda r: math_recipe(r[0], model="Qwen/Qwen2.5-0.5B", d=131_072),
    lambda r: r[0]["adapter"]["assignment_backend"] == "stateless" or pytest.fail(str(r)),
    lambda r: (
        r == {**r, "benchmarks": ["gsm8k"], "max_new_tokens": {"gsm8k": 1024}, "adapter": None}
        or pytest.fail(str(r))
    ),
    lambda r: (
        (r["benchmarks"], r["max_new_tokens"], Path(r["adapter"]).name.endswith("_131k"))
        == (["math"], {"math": 2048}, True)
        or pytest.fail(str(r))
    ),
]


def test_the_table_maps_every_command_by_its_path_prefix_only():
    assert len(ROWS) == len(EXPECTED)
    for theirs, ours in ROWS:
        assert theirs.startswith("python src/scripts/") and ours == theirs.replace(
            "src/scripts/", "examples/"
        )
        assert (ROOT / shlex.split(ours)[1]).is_file()


def fake_run(root: Path) -> None:
    """One finished run folder, as the runners write them."""
    folder = root / "rte" / "gpart-base" / "seed42"
    folder.mkdir(parents=True)
    final = {"task": "rte", "adapter_type": "gpart", "model_size": "base", "seed": 42, "test_metric": 0.7}
    final["params"] = {"adapter": 23_040, "head": 10, "trainable": 23_050, "total": 100}
    (folder / "final.json").write_text(json.dumps(final))


@pytest.mark.parametrize("row", range(len(ROWS)), ids=[ours.split()[1].split("/")[-1] for _, ours in ROWS])
def test_each_reference_command_resolves_to_the_reference_settings(row, tmp_path, monkeypatch, capsys):
    _, ours = ROWS[row]
    argv = shlex.split(ours)[2:]
    script = load(ROOT / shlex.split(ours)[1])
    monkeypatch.chdir(tmp_path)
    if "collect_results" in ours:
        fake_run(tmp_path / (argv[0] if argv else "runs/vit"))
        result = script.main(argv)
    elif "--adapter_path" in argv:
        (tmp_path / argv[argv.index("--adapter_path") + 1]).mkdir(parents=True)
        result = script.main([*argv, "--dry_run"])
    elif "--compute_params_only" in argv:
        result = script.main(argv)
    else:
        result = script.main([*argv, "--dry_run"])
    EXPECTED[row](result)


def run_entry(script: Path, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    module = load(script)
    monkeypatch.setattr(sys, "argv", [script.name, *argv])
    try:
        code = cli.entry(module.main)
    except SystemExit as err:
        code = err.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_every_entry_point_turns_failures_into_one_line(script):
    assert script.read_text().rstrip().endswith('if __name__ == "__main__":\n    sys.exit(cli.entry(main))')


@pytest.mark.parametrize("script", [p for p in ENTRY_POINTS if "collect" not in p.name], ids=lambda p: p.name)
def test_an_unknown_flag_prints_the_usage_and_one_error_line(script, monkeypatch, capsys):
    argv = ["--adapter_path", "x", "--no_such_flag"] if script.name.startswith("eval") else ["--no_such_flag"]
    code, err = run_entry(script, argv, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("usage:") and err.strip().splitlines()[-1].endswith(
        "unrecognized arguments: --no_such_flag"
    )


BAD = [
    (
        "glue/finetune_roberta_glue.py",
        ["--tasks", "sst2", "qnli", "adapter.dd", "1"],
        "did you mean ['adapter.d'",
    ),
    ("glue/finetune_roberta_glue.py", ["--tasks", "sst3"], "unknown task 'sst3'"),
    ("glue/finetune_roberta_glue.py", ["adapter.d"], "'key value' pairs"),
    ("glue/finetune_roberta_glue.py", ["--seed", "1", "--seeds", "2,3"], "not both"),
    (
        "glue/finetune_roberta_glue.py",
        ["--adapter_type", "lora", "adapter.d", "5"],
        "unknown config key 'adapter.d'",
    ),
    (
        "glue/finetune_roberta_glue.py",
        ["adapter.grouping_strategy", "sorted", "--compute_params_only"],
        "choose one",
    ),
    ("glue/eval_roberta_glue.py", ["--adapter_path", "missing", "--tasks", "rte"], "does not exist"),
    ("glue/collect_results_glue.py", ["nowhere"], "no final.json under nowhere"),
    ("vision/finetune_ViT.py", ["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    ("vision/finetune_ViT.py", ["--d", "many"], "invalid int value: 'many'"),
    (
        "vision/finetune_ViT.py",
        ["--adapter_type", "condlora", "--rank", "4", "--d", "9", "--dry_run"],
        "adapter.d",
    ),
    ("vision/eval_ViT.py", ["--dataset", "fgvc"], "--adapter_path"),
    ("math/finetune_metamath.py", ["--learning_rate", "fast"], "invalid float value: 'fast'"),
    ("math/eval_math.py", ["--dataset", "aime"], "invalid choice: 'aime'"),
    ("math/eval_math.py", ["--adapter_path", "missing"], "does not exist"),
]


@pytest.mark.parametrize(("script", "argv", "fragment"), BAD, ids=[f"{s}:{a[0]}" for s, a, _ in BAD])
def test_bad_input_is_one_line_naming_the_problem(script, argv, fragment, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = run_entry(ROOT / "examples" / script, argv, monkeypatch, capsys)
    assert code in (1, 2) and "Traceback" not in err
    message = err.strip().splitlines()
    assert fragment in message[-1] and message[-1].split(": ", 2)[1] == "error"
    if code == 1:  # not an argument error: exactly one line
        assert len(message) == 1


def test_an_unreachable_hub_is_one_line_with_the_fix(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--model_name", "nobody/no-such-model", "--compute_params_only"]
    code, err = run_entry(ROOT / "examples/math/finetune_metamath.py", argv, monkeypatch, capsys)
    (line,) = err.strip().splitlines()
    assert code == 1 and "could not load the config of 'nobody/no-such-model'" in line
    assert "pass --model_name a local folder" in line
    code, err = run_entry(
        ROOT / "examples/glue/finetune_roberta_glue.py", ["--tasks", "rte"], monkeypatch, capsys
    )
    (line,) = err.strip().splitlines()
    assert code == 1 and "could not load" in line and "need no download" in line


def test_math_params_only_builds_the_architecture_from_a_local_config(tmp_path, capsys):
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config.save_pretrained(tmp_path)
    script = load(ROOT / "examples/math/finetune_metamath.py")
    (counts,) = script.main(
        ["--model_name", str(tmp_path), "--adapter_type", "gpart", "--d", "1000", "--compute_params_only"]
    )
    assert counts["adapter"] == 1000 and counts["head"] == 0
    (lora,) = script.main(["--model_name", str(tmp_path), "--adapter_type", "lora", "--compute_params_only"])
    kv = 64 // 4 * 2  # two key/value heads of width 16
    per_layer = 4 * (64 + 64) + 4 * (64 + kv) * 2 + 4 * (64 + 64)  # q, k, v, o at rank 4
    assert lora["adapter"] == 2 * per_layer
