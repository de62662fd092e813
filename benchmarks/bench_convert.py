"""Time of ``python -m gpart convert`` from a reference folder, for a Llama-7B-shaped model.

    python benchmarks/bench_convert.py            # q_proj, v_proj of 32 layers: D = 1.07e9

Converting needs the layout (target names and shapes) and theta, nothing hashed: the model is
built from a ``transformers`` config on the ``meta`` device. The table gives the command's wall
time, and within it the time to build the meta model and to convert (the rest is starting Python
and importing torch and transformers). Writes ``benchmarks/results/convert.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, median, write_json
from safetensors.torch import save_file

import gpart

LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
_TIMER = """
import sys, time
from pathlib import Path
from gpart.cli import _meta_model
from gpart.peft_format import to_gpart_file
t0 = time.perf_counter()
model = _meta_model(Path(sys.argv[2]), None)
t1 = time.perf_counter()
to_gpart_file(Path(sys.argv[1]), model, Path(sys.argv[3]))
print(t1 - t0, time.perf_counter() - t1)
"""


def _folder(root: Path, d: int, layers: int) -> tuple[Path, Path]:
    ref = root / "ref"
    ref.mkdir()
    settings = {"peft_type": "GPART", "d": d, "proj_seed": 0, "target_modules": ["q_proj", "v_proj"]}
    (ref / "adapter_config.json").write_text(json.dumps(settings))
    save_file({"base_model.gpart_theta_d": torch.randn(d)}, str(ref / "adapter_model.safetensors"))
    config = root / "config.json"
    config.write_text(json.dumps({**LLAMA_7B, "num_hidden_layers": layers}))
    return ref, config


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=131_072)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=32, help="num_hidden_layers (32: Llama-7B)")
    args = p.parse_args(argv)
    command, meta, convert = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ref, config = _folder(Path(tmp), args.d, args.layers)
        out = Path(tmp) / "out.safetensors"
        for _ in range(args.repeats):
            start = time.perf_counter()
            cmd = [
                sys.executable,
                "-m",
                "gpart",
                "convert",
                str(ref),
                str(out),
                "--model-config",
                str(config),
            ]
            subprocess.run(cmd, check=True, capture_output=True)
            command.append(time.perf_counter() - start)
            inner = subprocess.run(
                [sys.executable, "-c", _TIMER, str(ref), str(config), str(out)],
                check=True,
                capture_output=True,
                text=True,
            )
            m, c = map(float, inner.stdout.strip().splitlines()[-1].split())
            meta.append(m)
            convert.append(c)
        size = int(gpart.read(out)[1]["D"])
    row = {
        "D": size,
        "d": args.d,
        "command_s": median(command),
        "meta_model_s": median(meta),
        "convert_s": median(convert),
    }
    print(f"{'D':>14} {'d':>9} {'command (s)':>12} {'meta model (s)':>15} {'convert (s)':>12}")
    print(
        f"{row['D']:>14,} {row['d']:>9,} {row['command_s']:>12.2f} {row['meta_model_s']:>15.2f} "
        f"{row['convert_s']:>12.3f}"
    )
    write_json("convert", {"machine": machine(), "rows": [row]})
    return row


if __name__ == "__main__":
    main()
