"""The math runners end to end: MetaMathQA-style training, then GSM8K/MATH evaluation on a merged model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "math"))
import eval_math  # noqa: E402
import finetune_metamath as metamath  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>", "Question", "Answer", ":", "what", "is", "plus", "?", "The", "answer"]
WORDS += [str(i) for i in range(21)] + ["boxed", "{", "}", "\\"]


def toy_tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(WORDS),
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def problems(n: int) -> list[tuple[str, int]]:
    return [(f"what is {a} plus {b} ?", a + b) for a in range(4) for b in range(4)][:n]


MATH_DATA = lambda: [{"query": q, "response": f"The answer is {s}"} for q, s in problems(16)]  # noqa: E731
TRAIN = metamath.Loaders(data=MATH_DATA, model=lambda cfg: (tiny_llama(), toy_tokenizer()))


def test_train_then_evaluate_on_a_merged_model(tmp_path):
    final = metamath.main(
        [
            "--output_dir",
            str(tmp_path / "runs"),
            "adapter.d",
            "200",
            "training.epochs",
            "2",
            "training.batch_size",
            "4",
            "training.grad_accum",
            "2",
            "training.lr",
            "0.05",
        ],
        loaders=TRAIN,
    )
    folder = tmp_path / "runs" / "metamathqa" / "gpart-base" / "seed42"
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["adapter"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
        and config["adapter"]["dropout"] == 0.05
    )
    assert config["training"]["schedule"] == "cosine" and config["training"]["max_grad_norm"] == 1.0
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and final["params"]["adapter"] == 200

    models = []

    def model_loader(name):
        models.append(tiny_llama())
        return models[-1], toy_tokenizer()

    def data(bench):
        if bench == "gsm8k":
            return [{"question": q, "answer": str(s)} for q, s in problems(4)]
        return [{"question": q, "answer": str(s)} for q, s in problems(3)]

    result = eval_math.main(
        [
            "--model_name",
            "tiny",
            "--adapter",
            str(folder / "adapter.safetensors"),
            "--max_new_tokens",
            "5",
            "--output",
            str(tmp_path / "eval"),
            "--batch_size",
            "2",
        ],
        loaders=eval_math.Loaders(data=data, model=model_loader),
    )
    assert result["engine"] == "hf" and result["gsm8k"]["n"] == 4 and result["math"]["n"] == 3
    assert 0.0 <= result["gsm8k"]["accuracy"] <= 100.0
    (model,) = models
    assert not hasattr(model, "gpart") and not any(
        "parametrizations" in n for n, _ in model.named_parameters()
    )
    # The reference's command line, with the adapter written in the reference's folder layout.
    import gpart

    reference = tiny_llama()
    gpart.load(reference, folder / "adapter.safetensors")
    gpart.save_peft(reference, tmp_path / "reference")
    argv = ["--model_path", "tiny", "--adapter_path", str(tmp_path / "reference"), "--dataset", "gsm8k"]
    argv += ["--max_new_tokens", "5", "--output", str(tmp_path / "eval_ref"), "--batch_size", "2"]
    again = eval_math.main(argv, loaders=eval_math.Loaders(data=data, model=model_loader))
    assert again["gsm8k"] == result["gsm8k"] and "math" not in again
    assert not any("parametrizations" in n for n, _ in models[-1].named_parameters())
    models.pop()
    rows = [json.loads(line) for line in (tmp_path / "eval" / "gsm8k.jsonl").read_text().splitlines()]
    assert {"completion", "prediction", "correct"} <= set(rows[0])
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["gsm8k"] == result["gsm8k"]
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "math_collect", Path(eval_math.__file__).parent / "collect_results.py"
    )
    collector = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collector)
    table = collector.main([str(tmp_path / "eval")])
    assert "| tiny + gpart |" in table and "(n=1)" in table


def test_scoring_rules():
    assert eval_math.correct("gsm8k", "so 3 + 4 = 7.\nThe answer is: 7", "7") == ("7", True)
    assert eval_math.correct("gsm8k", "The answer is 1,000", "1000") == ("1000", True)
    assert eval_math.correct("math", r"thus $\boxed{\dfrac{1}{2}}$", r"\frac{1}{2}") == (
        r"\dfrac{1}{2}",
        True,
    )
    assert eval_math.correct("math", "The answer is 3", "4")[1] is False
