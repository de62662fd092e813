"""bf16 bases: how much of a small delta survives the forward, and does training lag because of it?

    python benchmarks/bench_bf16.py                 # survival sweep + 300-step tiny LM, gpart vs reference

1. Survival: a bf16 weight W0 ~ N(0, 0.02) (768 x 768) and deltas of growing size. gpart's forward
   uses ``W = bf16(W0 + delta)`` (added in fp32, rounded once); reported: the fraction of entries
   where ``W != W0`` and the relative error of the effective delta ``(W - W0)`` against ``delta``.
   The reference-style path adds ``x @ delta^T`` separately, so its effective delta is ``delta``
   rounded to bf16 (relative error ~2^-9), never lost.
2. Training: a tiny Llama in bf16 (fp32 theta), the same data, seed and learning rate, trained
   with gpart and with the reference-style path; loss curves. The default (d = 4096, lr 1e-2) is
   a regime where this tiny model learns; ``--d 128 --lr 2e-3`` puts the per-step deltas near a
   bf16 ulp of W0 (where the forward loses most of them).

Writes ``benchmarks/results/bf16.json``.
"""

from __future__ import annotations

import argparse

import torch
from _common import machine, setup, write_json

from gpart import _delta


def survival(scales: list[float]) -> list[dict]:
    torch.manual_seed(0)
    w0 = (torch.randn(768, 768) * 0.02).to(torch.bfloat16)
    rows = []
    for rel in scales:
        delta = torch.randn(768 * 768) * 0.02 * rel
        w = _delta.add_delta(w0.reshape(-1), delta)
        effective = w.float() - w0.reshape(-1).float()
        ref_effective = delta.to(torch.bfloat16).float()
        rows.append(
            {
                "delta_over_w0": rel,
                "changed_fraction": float((w != w0.reshape(-1)).float().mean()),
                "gpart_rel_error": float((effective - delta).norm() / delta.norm()),
                "reference_rel_error": float((ref_effective - delta).norm() / delta.norm()),
            }
        )
    return rows


def lm(steps: int, lr: float, d: int) -> dict:
    import transformers

    curves = {}
    for method in ("gpart", "reference"):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=64,
            max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).requires_grad_(False)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        params = setup(method, model, targets, d=d)
        if method == "gpart":
            model.gpart.backend = "eager"
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(1)
        # A learnable stream: each sequence repeats a random 8-token motif.
        motifs = torch.randint(0, 64, (256, 8), generator=gen)
        losses = []
        for _ in range(steps):
            ids = motifs[torch.randint(0, 256, (8,), generator=gen)].repeat(1, 4)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[method] = losses
    return curves


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--d", type=int, default=4096)
    args = p.parse_args(argv)
    rows = survival([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    print(f"{'|delta|/|W0|':>13}{'W changed':>11}{'gpart rel err':>15}{'reference rel err':>19}")
    for r in rows:
        print(
            f"{r['delta_over_w0']:>13g}{r['changed_fraction']:>11.4f}{r['gpart_rel_error']:>15.4f}"
            f"{r['reference_rel_error']:>19.4f}"
        )
    curves = lm(args.steps, args.lr, args.d)
    print(f"\ntiny bf16 Llama, d={args.d}, {args.steps} steps, lr {args.lr}: mean loss per 50 steps")
    print(f"{'steps':>10}" + "".join(f"{m:>12}" for m in curves))
    for lo in range(0, args.steps, 50):
        print(
            f"{lo:>4}-{lo + 49:<5}"
            + "".join(f"{sum(c[lo : lo + 50]) / len(c[lo : lo + 50]):>12.4f}" for c in curves.values())
        )
    result = {"machine": machine(), "args": vars(args), "survival": rows, "curves": curves}
    print(f"wrote {write_json('bf16', result)}")
    return result


if __name__ == "__main__":
    main()
