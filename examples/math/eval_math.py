"""Evaluate a MetaMathQA-trained adapter on GSM8K and MATH with greedy decoding.

    python examples/math/eval_math.py --model_path Qwen/Qwen2.5-0.5B --dataset gsm8k     # the base model
    python examples/math/eval_math.py --model_path Qwen/Qwen2.5-0.5B \\
        --adapter_path runs/math/metamathqa/gpart-base/seed42/adapter.safetensors --dataset math
    python examples/math/eval_math.py --model_path Qwen/Qwen2.5-0.5B \\
        --adapter_path <the reference's adapter folder> --dataset gsm8k --max_samples 200

``--adapter_path`` takes a gpart file, or a folder saved by the reference (PEFT layout:
``adapter_config.json`` + ``adapter_model.safetensors``, read with ``gpart.load_peft``). The
adapter is loaded into the base model and **merged** before generation, so no delta is ever
recomputed per generated token (a merged model runs at the base model's speed). Decoding is greedy
(temperature 0), plain prompt "Question: {q}\\nAnswer: " without chat template, at most 1,024 new
tokens for GSM8K and 2,048 for MATH. With vLLM installed (and ``--engine vllm``) the merged model
is saved to a temporary folder and served by vLLM instead of ``transformers.generate``.
Answers: ``answers.extract_gsm8k`` / ``answers.extract_math`` + ``answers.is_equiv``.
Writes ``<output>/eval.json`` (accuracy per benchmark) and ``<output>/<benchmark>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import answers
from common import adapters, cli

MAX_NEW = {"gsm8k": 1024, "math": 2048}
PROMPT = "Question: {question}\nAnswer: "


@dataclass
class Loaders:
    """``data(benchmark) -> [{"question", "answer"}]`` (answer: the reference) and
    ``model(name) -> (model, tokenizer)``."""

    data: Callable[[str], list[dict]]
    model: Callable[[str], tuple]


def hub_data(benchmark: str) -> list[dict]:
    from datasets import load_dataset

    if benchmark == "gsm8k":
        rows = cli.hub("GSM8K (openai/gsm8k)", lambda: load_dataset("openai/gsm8k", "main", split="test"))
        return [{"question": r["question"], "answer": r["answer"].split("####")[-1].strip()} for r in rows]
    rows = cli.hub("MATH", lambda: load_dataset("hendrycks/competition_math", split="test"))
    return [{"question": r["problem"], "answer": answers.last_boxed(r["solution"]) or ""} for r in rows]


def hub_model(name: str):
    def load():
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        return transformers.AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16), tokenizer

    return cli.hub(f"the model {name!r}", load)


HUB = Loaders(data=hub_data, model=hub_model)


def correct(benchmark: str, completion: str, reference: str) -> tuple[str | None, bool]:
    if benchmark == "gsm8k":
        pred = answers.extract_gsm8k(completion)
        return pred, pred is not None and pred == answers.extract_gsm8k(reference)
    pred = answers.extract_math(completion)
    return pred, answers.is_equiv(pred, reference)


def generate_hf(model, tokenizer, prompts: list[str], max_new: int, batch_size: int) -> list[str]:
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for lo in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
        enc = tokenizer(prompts[lo : lo + batch_size], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            ids = model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def generate_vllm(model, tokenizer, prompts: list[str], max_new: int) -> list[str]:  # pragma: no cover - GPU
    import tempfile

    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        llm = LLM(model=tmp, dtype="bfloat16")
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new))
    return [o.outputs[0].text for o in outs]


def main(argv: list[str] | None = None, loaders: Loaders = HUB) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", "--model_name", dest="model_name", default="Qwen/Qwen2.5-0.5B")
    p.add_argument(
        "--adapter_path",
        "--adapter",
        dest="adapter",
        help="gpart file or reference folder (omit: base model)",
    )
    p.add_argument("--dataset", choices=sorted(MAX_NEW), help="one benchmark (the reference's flag)")
    p.add_argument("--benchmarks", default="gsm8k,math", help="comma-separated (default: both)")
    p.add_argument("--start", type=int, default=0, help="first problem index")
    p.add_argument("--end", type=int, default=None, help="one past the last problem index")
    p.add_argument("--max_samples", "--limit", dest="limit", type=int, default=0, help="at most N (0: all)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=0, help="override the per-benchmark limit")
    p.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto")
    p.add_argument("--output", default="runs/math_eval")
    p.add_argument("--dry_run", action="store_true", help="print the resolved settings and exit")
    args = p.parse_args(argv)
    benchmarks = [args.dataset] if args.dataset else [b for b in args.benchmarks.split(",") if b]
    unknown = [b for b in benchmarks if b not in MAX_NEW]
    if unknown:
        p.error(f"argument --benchmarks: unknown {unknown}; choose from {sorted(MAX_NEW)}")
    if args.adapter and not Path(args.adapter).exists():
        p.error(
            f"argument --adapter_path: {args.adapter} does not exist (a gpart file or a reference folder)"
        )
    settings = {
        "model_name": args.model_name,
        "adapter": args.adapter,
        "benchmarks": benchmarks,
        "max_new_tokens": {b: args.max_new_tokens or MAX_NEW[b] for b in benchmarks},
        "start": args.start,
        "end": args.end,
        "limit": args.limit,
    }
    if args.dry_run:
        print(json.dumps(settings, sort_keys=True))
        return settings

    model, tokenizer = loaders.model(args.model_name)
    if args.adapter:
        adapters.load_merged(model, args.adapter)  # plain weights: generation never recomputes a delta
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    engine = args.engine
    if engine == "auto":
        try:
            import vllm  # noqa: F401

            engine = "vllm" if device.type == "cuda" else "hf"
        except ImportError:
            engine = "hf"
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"model_name": args.model_name, "adapter": args.adapter, "engine": engine}
    for bench in benchmarks:
        rows = loaders.data(bench)[args.start : args.end][: args.limit or None]
        prompts = [PROMPT.format(question=r["question"]) for r in rows]
        max_new = settings["max_new_tokens"][bench]
        if engine == "vllm":
            completions = generate_vllm(model, tokenizer, prompts, max_new)
        else:
            completions = generate_hf(model, tokenizer, prompts, max_new, args.batch_size)
        hits = 0
        with open(out_dir / f"{bench}.jsonl", "w") as f:
            for row, completion in zip(rows, completions, strict=True):
                pred, ok = correct(bench, completion, row["answer"])
                hits += ok
                f.write(
                    json.dumps({**row, "completion": completion, "prediction": pred, "correct": ok}) + "\n"
                )
        results[bench] = {"accuracy": 100.0 * hits / max(1, len(rows)), "n": len(rows)}
        print(f"{bench}: {results[bench]['accuracy']:.2f}% of {len(rows)}")
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(cli.entry(main))
